use thiserror::Error;

/// Errors from tensor ops. Shape errors name the op and both shapes.
#[derive(Debug, Error)]
pub enum KilnError {
    #[error(transparent)]
    Gpu(#[from] kiln_wgpu::GpuError),
    #[error("{op}: shape mismatch between {lhs:?} and {rhs:?}{detail}")]
    Shape { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize>, detail: String },
    #[error("{op}: {message} (shape {shape:?})")]
    Invalid { op: &'static str, shape: Vec<usize>, message: String },
    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType { op: &'static str, expected: crate::DType, got: crate::DType },
    #[error("{op}: {len} values do not fill shape {shape:?} ({numel} elements)")]
    DataLen { op: &'static str, len: usize, shape: Vec<usize>, numel: usize },
    #[error("backward: {0}")]
    Backward(String),
    #[error("gradcheck: {0}")]
    Gradcheck(String),
    /// Settings that cannot work together, an unknown name, a flag that does not apply.
    #[error("{0}")]
    Config(String),
    /// The library used out of order (a parameter before `VarStore::finish`, a kernel without buffers).
    #[error("{0}")]
    Usage(String),
    /// A file that could not be read or written; names it.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// A data set or a batch that is wrong; the message names the file or the sample.
    #[error("{0}")]
    Data(String),
    /// A checkpoint that is missing, corrupt or of another model; the message names the file.
    #[error("{0}")]
    Checkpoint(String),
    /// Training that cannot go on (a loss that became NaN or infinite).
    #[error("{0}")]
    Training(String),
    /// Training stopped by the user (Ctrl-C) after saving where it was.
    #[error("{0}")]
    Interrupted(String),
}

pub type Result<T, E = KilnError> = std::result::Result<T, E>;

pub(crate) fn shape_err<T>(op: &'static str, lhs: &[usize], rhs: &[usize], detail: impl Into<String>) -> Result<T> {
    let d = detail.into();
    Err(KilnError::Shape { op, lhs: lhs.to_vec(), rhs: rhs.to_vec(), detail: if d.is_empty() { d } else { format!(": {d}") } })
}

pub(crate) fn invalid<T>(op: &'static str, shape: &[usize], message: impl Into<String>) -> Result<T> {
    Err(KilnError::Invalid { op, shape: shape.to_vec(), message: message.into() })
}
