use thiserror::Error;

/// Everything that can go wrong below the tensor level. Each variant names what the user needs to act on.
#[derive(Debug, Error)]
pub enum GpuError {
    #[error("no GPU adapter found{0}. On Debian/Ubuntu install the software Vulkan driver: `apt-get install -y --no-install-recommends mesa-vulkan-drivers`, then run with WGPU_BACKEND=vulkan")]
    NoAdapter(String),
    #[error("no adapter matches {wanted:?} (from --adapter or KILN_ADAPTER); available: {available}")]
    AdapterNotFound { wanted: String, available: String },
    #[error("could not open a device on adapter {adapter}: {message}")]
    RequestDevice { adapter: String, message: String },
    #[error("the GPU was already initialised on adapter {current:?}; cannot switch to {wanted:?} in the same process")]
    AlreadyInitialised { current: String, wanted: String },
    #[error("shader {shader} (entry {entry}) failed to compile or link: {message}")]
    Shader { shader: String, entry: String, message: String },
    #[error("out of GPU memory: asked for {requested} bytes ({what}); {detail}")]
    OutOfMemory { requested: u64, what: String, detail: String },
    #[error("tensor of {bytes} bytes exceeds this adapter's max_storage_buffer_binding_size of {limit} bytes ({what})")]
    BindingTooLarge { bytes: u64, limit: u64, what: String },
    #[error("GPU validation error after recording {context}: {message}")]
    Validation { context: String, message: String },
    #[error("{what}: tensors on two devices, {a} and {b}; move one with Tensor::to(&device)")]
    CrossDevice { what: String, a: String, b: String },
    #[error("reading back from the GPU failed: {0}")]
    Readback(String),
    #[error("GPU device lost or poll failed: {0}")]
    Poll(String),
    #[error("could not write kernel dump to {path}: {message}")]
    Dump { path: String, message: String },
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;
