//! A device context: device, queue, pipeline cache, buffer pool and the open recording. A process may open
//! several (`Device::open`, one per adapter or several logical ones on one adapter); each owns its own pool,
//! caches, counters and settings, and every buffer knows the device it belongs to.
//!
//! Nothing is submitted when an op runs: every dispatch is appended to one open compute pass. The recording is
//! flushed (finish + submit) only when the host must see a value, when the params ring is full, or on request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use crate::adapter;
use crate::error::{GpuError, Result};

/// A WGSL source, compiled once per device. Kiln's own (`shaders/`) are trusted: wgpu's loop-bound counters are
/// left out of them (see `module`). A crate's own kernels are made with [`Shader::new`], which keeps them.
/// Each `static` is its own module: two shaders never share a cache entry, whatever their names.
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
    /// Whether wgpu's counters that stop a runaway loop stay in (true for shaders from outside Kiln).
    pub loop_checks: bool,
}

impl Shader {
    /// A shader from outside Kiln (a custom op's kernels): compiled with every runtime check wgpu has.
    pub const fn new(name: &'static str, source: &'static str) -> Shader {
        Shader { name, source, loop_checks: true }
    }

    /// The cache key: the static's address.
    fn key(&'static self) -> usize {
        self as *const Shader as usize
    }
}

/// One compute dispatch. Bindings: 0 = `params` (uniform), 1..=inputs.len() read-only storage, then the outputs
/// as read-write storage, in order. Shaders declare exactly this layout.
pub struct Dispatch<'a> {
    pub shader: &'static Shader,
    pub entry: &'static str,
    /// WGSL `override` constants; each distinct set is its own cached pipeline.
    pub constants: &'a [(&'static str, f64)],
    /// Little-endian bytes of the shader's `Params` struct (padded to 16 bytes here).
    pub params: &'a [u8],
    pub inputs: &'a [&'a BufView],
    pub outputs: &'a [&'a BufView],
    /// Read-only texture copies of buffers (`Gpu::texture_of`), bound as `texture_2d<f32>` after the outputs.
    pub textures: &'a [&'a TexView],
    pub workgroups: [u32; 3],
}

/// Counters for `submits_per_step`, allocation checks and peak memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuStats {
    pub submits: u64,
    pub dispatches: u64,
    pub buffers_created: u64,
    pub bytes_created: u64,
    pub pipelines_created: u64,
    pub bind_groups_created: u64,
    /// Bytes in buffers handed out right now (pooled buffers not counted).
    pub live_bytes: u64,
    pub peak_live_bytes: u64,
}

/// A pooled GPU buffer. It returns to the pool when dropped.
pub struct PooledBuffer {
    raw: Option<wgpu::Buffer>,
    /// The device whose pool the buffer returns to; a live tensor keeps its device open.
    device: Device,
    class: u64,
    /// Creation order: the pool hands out the oldest free buffer of a class first.
    serial: u64,
}

impl PooledBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.raw.as_ref().expect("buffer present until drop")
    }
    pub fn capacity(&self) -> u64 {
        self.class
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// A pooled texture and the view kernels bind.
type TextureAndView = (wgpu::Texture, wgpu::TextureView);

/// Texels per row of a `TexView` (4096 floats, 16 KiB: a multiple of the 256-byte copy row alignment).
pub const TEX_ROW_TEXELS: u32 = 1024;

/// A read-only rgba32float copy of a buffer range: float i lies in texel (i / 4 % 1024, i / 4 / 1024), component
/// i % 4. Lavapipe (Mesa's CPU driver) fetches texels with vector gathers but reads storage buffers one lane at a
/// time in a branchy loop: 8x slower per float, measured (README "How it runs"). Kernels that read an operand
/// many times read it from one of these. Pooled by row count like buffers; cheap to clone.
#[derive(Clone)]
pub struct TexView {
    texture: Arc<PooledTexture>,
    /// Floats copied in.
    pub floats: u64,
}

pub struct PooledTexture {
    raw: Option<TextureAndView>,
    /// Weak: the device's texture cache holds textures, so a strong handle would keep the device alive forever.
    device: Weak<Gpu>,
    device_id: u64,
    rows: u32,
    serial: u64,
}

impl PooledTexture {
    fn raw(&self) -> &TextureAndView {
        self.raw.as_ref().expect("a live texture")
    }
}

impl Drop for PooledTexture {
    fn drop(&mut self) {
        if let (Some(raw), Some(gpu)) = (self.raw.take(), self.device.upgrade()) {
            gpu.release_texture(raw, self.rows, self.serial);
        }
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.device.release(raw, self.class, self.serial);
        }
    }
}

/// A byte range of a pooled buffer: what a tensor's storage is. Cheap to clone.
#[derive(Clone)]
pub struct BufView {
    pub buffer: Arc<PooledBuffer>,
    pub offset: u64,
    pub bytes: u64,
}

impl BufView {
    /// A sub-range of this view (offset relative to this view). Offsets that bind to kernels must respect the
    /// adapter's `min_storage_buffer_offset_alignment`; copies only need 4-byte alignment.
    pub fn sub(&self, offset: u64, bytes: u64) -> BufView {
        assert!(offset + bytes <= self.bytes, "sub-view out of range");
        BufView { buffer: self.buffer.clone(), offset: self.offset + offset, bytes }
    }
    pub fn same_buffer(&self, other: &BufView) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }
    /// The device this view's buffer lives on.
    pub fn device(&self) -> &Device {
        &self.buffer.device
    }
}

const RING_BYTES: u64 = 4 << 20;
/// The uniform window each dispatch's bind group sees of the params ring, at a dynamic offset: every params
/// struct fits in it, and it lets one bind group serve every dispatch on the same buffers.
const PARAMS_WINDOW: u64 = 256;
/// Bind groups kept for reuse; past this many the cache starts over (they hold pooled buffers, never freed
/// ones, so the bound only limits host memory).
const BIND_GROUP_CACHE: usize = 16384;
const MIN_CLASS: u64 = 256;

#[derive(Hash, PartialEq, Eq, Clone)]
struct PipelineKey {
    shader: usize,
    entry: &'static str,
    constants: Vec<(&'static str, u64)>,
    inputs: usize,
    outputs: usize,
    textures: usize,
}

/// Bindings after the params: read-only storage buffers, read-write ones, textures.
type LayoutKey = (usize, usize, usize);

impl PipelineKey {
    fn layout(&self) -> LayoutKey {
        (self.inputs, self.outputs, self.textures)
    }
}

#[derive(Hash, PartialEq, Eq)]
struct BindKey {
    layout: LayoutKey,
    /// (buffer, offset, size) per storage binding, in binding order.
    ranges: Vec<(wgpu::Buffer, u64, u64)>,
    textures: Vec<wgpu::Texture>,
}

struct State {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    /// Free buffers by size class, by serial. Handing out the lowest serial makes which buffer an allocation gets
    /// depend only on which are free, not on the order they were freed in (a HashMap of gradients drops in a
    /// different order each step): a step that repeats gets the same buffers, so its bind groups repeat too.
    pool: HashMap<u64, std::collections::BTreeMap<u64, wgpu::Buffer>>,
    next_serial: u64,
    /// Buffers freed while the open recording may still read them: they rejoin the pool after the next submit, so
    /// a `queue.write_buffer` into a reused buffer can never land before the dispatches recorded earlier.
    quarantine: Vec<(wgpu::Buffer, u64, u64)>,
    /// Free textures by row count (a power of two), by serial. A texture is only written by copies recorded in
    /// the command stream, after every earlier read of it, so it may be reused as soon as it is dropped.
    texture_pool: HashMap<u32, std::collections::BTreeMap<u64, TextureAndView>>,
    /// Texture copies by (buffer serial, offset, bytes), reused while that buffer is not written: a weight read
    /// by the forward and the backward pass, or an activation read by three kernels, is copied once. Any write
    /// to a buffer (a dispatch output, a copy, a clear, a host write) and its release drop its entries.
    texture_cache: HashMap<(u64, u64, u64), TexView>,
    readback_pool: HashMap<u64, Vec<wgpu::Buffer>>,
    ring: wgpu::Buffer,
    ring_host: Vec<u8>,
    modules: HashMap<usize, wgpu::ShaderModule>,
    layouts: HashMap<LayoutKey, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    /// Bind groups by layout and bound buffer ranges. A training step whose shapes repeat draws the same
    /// pooled buffers in the same order each time, so from its second step on every dispatch finds its bind
    /// group here: the step is recorded with reused pipelines, bind groups and buffers.
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
    stats: GpuStats,
    recorded_ops: u64,
    /// Timestamp queries for `gpu_time_ms`: the query set, and whether the next pass should write them.
    query_set: Option<wgpu::QuerySet>,
    timestamps_armed: bool,
    /// Passes opened under `gpu_time_ms` so far: pass i writes timestamps 2i and 2i + 1.
    timed_passes: u32,
    profile: Profile,
}

/// Texture copies kept for reuse at most (`State::texture_cache`).
const TEXTURE_CACHE: usize = 128;

/// Compute passes `gpu_time_ms` can time in one call (two timestamps each).
const TIMED_PASSES: u32 = 64;

/// Dispatches per profiled submit (two timestamps each).
const PROFILE_SLOTS: u32 = 1024;

/// Per-kernel GPU time under profiling: timestamps around each dispatch, read back at each submit.
#[derive(Default)]
struct Profile {
    query_set: Option<wgpu::QuerySet>,
    /// The kernel of each timestamp pair recorded since the last submit.
    pending: Vec<String>,
    totals: HashMap<String, (u64, f64)>,
}

/// One kernel's share of the GPU time since profiling began (`Gpu::profile_take`).
#[derive(Clone, Debug)]
pub struct KernelTime {
    /// `shader::entry` and its override constants.
    pub kernel: String,
    pub dispatches: u64,
    pub ms: f64,
}

/// A device context. Held through a [`Device`] handle; [`gpu()`] is the process's default one.
pub struct Gpu {
    /// Unique in the process: names the device in errors and tells devices apart.
    id: u64,
    /// This context's own handle, for the buffers and readbacks it hands out.
    me: Weak<Gpu>,
    /// Per-device switches of the layers above (fusion, texture reads, conv lowering, autotune), by name.
    settings: Mutex<HashMap<&'static str, u8>>,
    /// State the layers above keep per device (the autotuner), one value per type.
    extensions: Mutex<HashMap<std::any::TypeId, Arc<dyn std::any::Any + Send + Sync>>>,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    device: wgpu::Device,
    queue: wgpu::Queue,
    state: Mutex<State>,
    uncaptured: Arc<Mutex<Option<String>>>,
    dump_dir: Option<std::path::PathBuf>,
    log: bool,
    /// `KILN_PROFILE=1` (or `set_profiling`): every dispatch in a pass of its own between two timestamps.
    profiling: std::sync::atomic::AtomicBool,
    /// Textures dropped since the pool last took them back. A texture can drop while `state` is locked (the
    /// texture cache lets go of copies under the lock), so its drop only pushes here; `texture_of` moves them
    /// into `State::texture_pool`.
    returned_textures: Mutex<Vec<(u32, u64, TextureAndView)>>,
    /// Bytes in live textures (outside `state` for the same reason); `stats` adds them to the buffers'.
    texture_live_bytes: std::sync::atomic::AtomicU64,
    binding_limit: u64,
}

/// Submits and buffer creations made by the calling thread (the process-wide numbers mix in other threads'
/// work, as in a parallel test run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadStats {
    pub submits: u64,
    pub dispatches: u64,
    pub buffers_created: u64,
    pub bytes_created: u64,
    /// Bind groups made (not found in the cache) by this thread's dispatches.
    pub bind_groups_created: u64,
    /// Bytes of buffers (`alloc`) and texture copies (`texture_of`, not counting reuse) handed out, new or from
    /// the pools, by size class.
    pub bytes_handed_out: u64,
}

thread_local! {
    static THREAD_STATS: std::cell::Cell<ThreadStats> = const { std::cell::Cell::new(ThreadStats { submits: 0, dispatches: 0, buffers_created: 0, bytes_created: 0, bind_groups_created: 0, bytes_handed_out: 0 }) };
}

/// Updates this thread's counters.
fn bump_thread(f: impl FnOnce(&mut ThreadStats)) {
    THREAD_STATS.with(|c| {
        let mut s = c.get();
        f(&mut s);
        c.set(s);
    });
}

fn count_thread(submits: u64, buffers: u64, bytes: u64) {
    bump_thread(|s| {
        s.submits += submits;
        s.buffers_created += buffers;
        s.bytes_created += bytes;
    });
}

/// This thread's counters.
pub fn thread_stats() -> ThreadStats {
    THREAD_STATS.with(|c| c.get())
}

static GPU: OnceLock<Device> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());
static NEXT_DEVICE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How to open a [`Device`]. Fields left `None` take their environment default (`KILN_ADAPTER`,
/// `KILN_MAX_BINDING_BYTES`, `KILN_PROFILE`), read when the device opens.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// Substring of the adapter's name or backend, or an index from `kiln info`; default: the best adapter.
    pub adapter: Option<String>,
    /// Binds at most this many bytes per tensor (at least 1024), below the adapter's own limit: exercises the
    /// paths that split big operands on any adapter.
    pub max_binding_bytes: Option<u64>,
    /// Times every dispatch (see [`Gpu::set_profiling`]).
    pub profiling: Option<bool>,
}

/// A handle to one device context: cheap to clone, compared by identity. Every tensor's storage knows its device;
/// ops on tensors of two devices are errors. Dereferences to [`Gpu`] for the context's methods.
#[derive(Clone)]
pub struct Device(Arc<Gpu>);

impl std::ops::Deref for Device {
    type Target = Gpu;
    fn deref(&self) -> &Gpu {
        &self.0
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Device) -> bool {
        self.id == other.id
    }
}
impl Eq for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Device {
    /// Opens a new device context on an adapter: its own wgpu device and queue, pool, caches and settings.
    /// Opening two on the same adapter gives two independent logical devices.
    pub fn open(options: &DeviceOptions) -> Result<Device> {
        let wanted = options.adapter.clone().or_else(|| std::env::var("KILN_ADAPTER").ok());
        let g = Gpu::new(wanted.as_deref(), options)?;
        Ok(Device(Arc::new_cyclic(|me| Gpu { me: me.clone(), ..g })))
    }

    /// The process's default device (what [`gpu()`] returns), opened on first use.
    pub fn default_device() -> Result<Device> {
        gpu()?;
        Ok(GPU.get().expect("opened by gpu()").clone())
    }

    /// The device new tensors go to on this thread: the innermost [`Device::scope`], else the default device.
    pub fn current() -> Result<Device> {
        match CURRENT.with(|c| c.borrow().last().cloned()) {
            Some(d) => Ok(d),
            None => Device::default_device(),
        }
    }

    /// Runs `f` with this device as the thread's current device: tensors made without naming a device
    /// (`Tensor::from_slice`, a `VarStore::new`'s parameters) go to it, as inside PyTorch's `with
    /// torch.device(...)`. Scopes nest; other threads are not affected.
    pub fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Pop;
        impl Drop for Pop {
            fn drop(&mut self) {
                CURRENT.with(|c| c.borrow_mut().pop());
            }
        }
        CURRENT.with(|c| c.borrow_mut().push(self.clone()));
        let _pop = Pop;
        f()
    }
}

thread_local! {
    /// The stack of `Device::scope`s on this thread.
    static CURRENT: std::cell::RefCell<Vec<Device>> = const { std::cell::RefCell::new(Vec::new()) };
}
static CHOICE: Mutex<Option<String>> = Mutex::new(None);

/// Names the adapter to use (substring of its name or backend, or an index from `kiln info`) before first use.
/// `None` keeps the default: `KILN_ADAPTER` if set, else the best adapter.
pub fn select_adapter(name: Option<&str>) -> Result<()> {
    if let Some(g) = GPU.get() {
        if let Some(wanted) = name {
            let hay = format!("{} {:?}", g.info.name, g.info.backend).to_lowercase();
            if !hay.contains(&wanted.to_lowercase()) && wanted.parse::<usize>().is_err() {
                return Err(GpuError::AlreadyInitialised { current: g.info.name.clone(), wanted: wanted.into() });
            }
        }
        return Ok(());
    }
    *CHOICE.lock().unwrap_or_else(|e| e.into_inner()) = name.map(str::to_string);
    Ok(())
}

/// The process's default device, created on first use. Errors (no adapter, bad `KILN_ADAPTER`) are returned, not cached, so a
/// caller can fix the environment and retry.
pub fn gpu() -> Result<&'static Gpu> {
    if let Some(g) = GPU.get() {
        return Ok(g);
    }
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = GPU.get() {
        return Ok(g);
    }
    let adapter = CHOICE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let g = Device::open(&DeviceOptions { adapter, ..DeviceOptions::default() })?;
    Ok(GPU.get_or_init(|| g))
}

fn size_class(bytes: u64) -> u64 {
    bytes.max(MIN_CLASS).next_power_of_two()
}

fn pad16(params: &[u8]) -> Vec<u8> {
    let mut p = params.to_vec();
    let len = p.len().max(16).div_ceil(16) * 16;
    p.resize(len, 0);
    p
}

impl Gpu {
    fn new(wanted: Option<&str>, options: &DeviceOptions) -> Result<Gpu> {
        let instance = adapter::instance();
        let adapter = adapter::choose(adapter::enumerate(&instance), wanted)?;
        let info = adapter.get_info();
        let features = adapter.features() & adapter::wanted_features();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::RequestDevice { adapter: adapter::describe(&info), message: e.to_string() })?;
        // wgpu's default handler panics; keep the message and report it as an error at the next flush instead.
        let uncaptured = Arc::new(Mutex::new(None::<String>));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        let ring = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln params ring"),
            size: RING_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let state = State {
            encoder: None,
            pass: None,
            pool: HashMap::new(),
            quarantine: Vec::new(),
            texture_pool: HashMap::new(),
            texture_cache: HashMap::new(),
            next_serial: 0,
            readback_pool: HashMap::new(),
            ring,
            ring_host: Vec::with_capacity(RING_BYTES as usize),
            modules: HashMap::new(),
            layouts: HashMap::new(),
            pipelines: HashMap::new(),
            bind_groups: HashMap::new(),
            stats: GpuStats::default(),
            recorded_ops: 0,
            query_set: None,
            timestamps_armed: false,
            timed_passes: 0,
            profile: Profile::default(),
        };
        let env_flag = |name: &str| std::env::var(name).map(|v| v != "0").unwrap_or(false);
        let binding_limit = options.max_binding_bytes.or_else(|| std::env::var("KILN_MAX_BINDING_BYTES").ok().and_then(|v| v.parse::<u64>().ok()));
        Ok(Gpu {
            id: NEXT_DEVICE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            me: Weak::new(),
            settings: Mutex::new(HashMap::new()),
            extensions: Mutex::new(HashMap::new()),
            info,
            features,
            limits: limits.clone(),
            device,
            queue,
            state: Mutex::new(state),
            uncaptured,
            dump_dir: std::env::var_os("KILN_DUMP_WGSL").map(Into::into),
            binding_limit: binding_limit.map(|v| v.max(1024)).unwrap_or(u64::MAX).min(limits.max_storage_buffer_binding_size as u64),
            log: env_flag("KILN_LOG"),
            profiling: std::sync::atomic::AtomicBool::new(options.profiling.unwrap_or_else(|| env_flag("KILN_PROFILE"))),
            returned_textures: Mutex::new(Vec::new()),
            texture_live_bytes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// "name (Backend, DeviceType)", as reports print it.
    pub fn adapter_name(&self) -> String {
        adapter::describe(&self.info)
    }
    /// This context's number in the process (the default device is usually 1).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// "device #id on name (Backend, DeviceType)", as errors name a device.
    pub fn describe(&self) -> String {
        format!("device #{} on {}", self.id, self.adapter_name())
    }
    /// A handle to this context.
    pub fn handle(&self) -> Device {
        Device(self.me.upgrade().expect("a Gpu lives inside its Device"))
    }
    /// A switch of the layers above, by name (`None`: not set on this device, so their default applies).
    pub fn setting(&self, key: &'static str) -> Option<u8> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied()
    }
    /// Sets (Some) or clears (None) a switch on this device only.
    pub fn set_setting(&self, key: &'static str, value: Option<u8>) {
        let mut s = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match value {
            Some(v) => s.insert(key, v),
            None => s.remove(key),
        };
    }
    /// The value of type `T` kept on this device by a layer above, if any.
    pub fn extension<T: std::any::Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let map = self.extensions.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&std::any::TypeId::of::<T>()).cloned().and_then(|v| v.downcast::<T>().ok())
    }
    /// Keeps `value` on this device unless a `T` is already there; returns the one kept. It must not hold a
    /// tensor or a `Device` of this device (that would keep the device open forever).
    pub fn insert_extension<T: std::any::Any + Send + Sync>(&self, value: T) -> Arc<T> {
        let mut map = self.extensions.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.entry(std::any::TypeId::of::<T>()).or_insert_with(|| Arc::new(value)).clone();
        v.downcast::<T>().expect("stored under its own TypeId")
    }
    /// An error unless `view` lives on this device.
    fn check_device(&self, view: &BufView, what: &str) -> Result<()> {
        if view.buffer.device.id != self.id {
            return Err(GpuError::CrossDevice { what: what.to_string(), a: self.describe(), b: view.buffer.device.describe() });
        }
        Ok(())
    }
    pub fn backend(&self) -> String {
        format!("{:?}", self.info.backend)
    }
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> GpuStats {
        let mut stats = self.lock().stats;
        stats.live_bytes += self.texture_bytes();
        stats
    }

    fn texture_bytes(&self) -> u64 {
        self.texture_live_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Restarts the peak-memory count from what is live now (so a benchmark reports its own peak).
    pub fn reset_peak(&self) {
        let mut st = self.lock();
        st.stats.peak_live_bytes = st.stats.live_bytes + self.texture_bytes();
    }

    /// Largest tensor a kernel can bind: the adapter's max_storage_buffer_binding_size, or less when
    /// KILN_MAX_BINDING_BYTES asks (to exercise the split paths of big operands on any adapter).
    pub fn max_binding_bytes(&self) -> u64 {
        self.binding_limit
    }

    /// A buffer of at least `bytes` from the pool (contents undefined). `what` names the tensor for errors.
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<BufView> {
        let bytes = bytes.max(4).div_ceil(4) * 4;
        if bytes > self.limits.max_buffer_size {
            return Err(GpuError::OutOfMemory {
                requested: bytes,
                what: what.to_string(),
                detail: format!("this adapter's max_buffer_size is {} bytes", self.limits.max_buffer_size),
            });
        }
        let class = size_class(bytes).min(self.limits.max_buffer_size.max(bytes));
        let mut st = self.lock();
        let (serial, raw) = match st.pool.get_mut(&class).and_then(|free| free.pop_first()) {
            Some(b) => b,
            None => {
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: class,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                if let Some(e) = pollster::block_on(scope.pop()) {
                    return Err(GpuError::OutOfMemory {
                        requested: class,
                        what: what.to_string(),
                        detail: format!("{e}; {} bytes already in use", st.stats.live_bytes),
                    });
                }
                st.stats.buffers_created += 1;
                st.stats.bytes_created += class;
                count_thread(0, 1, class);
                st.next_serial += 1;
                (st.next_serial, b)
            }
        };
        st.stats.live_bytes += class;
        bump_thread(|t| t.bytes_handed_out += class);
        st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes + self.texture_bytes());
        Ok(BufView { buffer: Arc::new(PooledBuffer { raw: Some(raw), device: self.handle(), class, serial }), offset: 0, bytes })
    }

    /// Copies `view` (at a 16-byte aligned offset) into a pooled texture for kernels that read it many times
    /// (see `TexView`). A last partial texel is copied whole from the buffer's spare bytes (its tail is garbage
    /// the kernels never read); a view without them is an error. The copy is recorded in the open command stream.
    pub fn texture_of(&self, view: &BufView, what: &str) -> Result<TexView> {
        self.check_device(view, what)?;
        let texels = view.bytes.div_ceil(16);
        let rows = texels.div_ceil(TEX_ROW_TEXELS as u64).max(1);
        if view.offset % 16 != 0 || view.offset + 16 * texels > view.buffer.capacity() {
            return Err(GpuError::Validation { context: format!("texture copy of {what}"), message: format!("{} bytes at byte offset {} of a {}-byte buffer: the offset must be a multiple of 16 and the last texel within the buffer", view.bytes, view.offset, view.buffer.capacity()) });
        }
        if rows > self.limits.max_texture_dimension_2d as u64 {
            return Err(GpuError::BindingTooLarge { bytes: view.bytes, limit: self.limits.max_texture_dimension_2d as u64 * TEX_ROW_TEXELS as u64 * 16, what: format!("texture copy of {what}") });
        }
        let class = (rows as u32).next_power_of_two().min(self.limits.max_texture_dimension_2d);
        let bytes = class as u64 * TEX_ROW_TEXELS as u64 * 16;
        let mut st = self.lock();
        let key = (view.buffer.serial, view.offset, view.bytes);
        if let Some(t) = st.texture_cache.get(&key) {
            return Ok(t.clone());
        }
        for (rows, serial, raw) in std::mem::take(&mut *self.returned_textures.lock().unwrap_or_else(|e| e.into_inner())) {
            st.texture_pool.entry(rows).or_default().insert(serial, raw);
        }
        let (serial, raw) = match st.texture_pool.get_mut(&class).and_then(|free| free.pop_first()) {
            Some(t) => t,
            None => {
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let texture = self.device.create_texture(&wgpu::TextureDescriptor {
                    label: Some("kiln operand texture"),
                    size: wgpu::Extent3d { width: TEX_ROW_TEXELS, height: class, depth_or_array_layers: 1 },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgpu::TextureDimension::D2,
                    format: wgpu::TextureFormat::Rgba32Float,
                    usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                    view_formats: &[],
                });
                if let Some(e) = pollster::block_on(scope.pop()) {
                    return Err(GpuError::OutOfMemory { requested: bytes, what: format!("texture copy of {what}"), detail: format!("{e}; {} bytes already in use", st.stats.live_bytes + self.texture_bytes()) });
                }
                let tv = texture.create_view(&wgpu::TextureViewDescriptor::default());
                st.stats.buffers_created += 1;
                st.stats.bytes_created += bytes;
                count_thread(0, 1, bytes);
                st.next_serial += 1;
                (st.next_serial, (texture, tv))
            }
        };
        let textures = self.texture_live_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
        bump_thread(|t| t.bytes_handed_out += bytes);
        st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes + textures);
        Self::end_pass(&mut st);
        let row_bytes = TEX_ROW_TEXELS as u64 * 16;
        let (full_rows, tail) = (texels / TEX_ROW_TEXELS as u64, texels % TEX_ROW_TEXELS as u64);
        let enc = self.encoder(&mut st);
        let mut copy = |offset: u64, y: u64, width: u64, height: u64| {
            enc.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo { buffer: view.buffer.raw(), layout: wgpu::TexelCopyBufferLayout { offset, bytes_per_row: Some(row_bytes as u32), rows_per_image: None } },
                wgpu::TexelCopyTextureInfo { texture: &raw.0, mip_level: 0, origin: wgpu::Origin3d { x: 0, y: y as u32, z: 0 }, aspect: wgpu::TextureAspect::All },
                wgpu::Extent3d { width: width as u32, height: height as u32, depth_or_array_layers: 1 },
            );
        };
        if view.offset + rows * row_bytes <= view.buffer.capacity() {
            // One copy of whole rows where the buffer has the room (its spare bytes land past the view's floats).
            copy(view.offset, 0, TEX_ROW_TEXELS as u64, rows);
        } else {
            if full_rows > 0 {
                copy(view.offset, 0, TEX_ROW_TEXELS as u64, full_rows);
            }
            if tail > 0 {
                copy(view.offset + full_rows * row_bytes, full_rows, tail, 1);
            }
        }
        st.recorded_ops += 1;
        let t = TexView { texture: Arc::new(PooledTexture { raw: Some(raw), device: self.me.clone(), device_id: self.id, rows: class, serial }), floats: view.bytes / 4 };
        if st.texture_cache.len() >= TEXTURE_CACHE {
            st.texture_cache.clear();
        }
        st.texture_cache.insert(key, t.clone());
        Ok(t)
    }

    /// Drops the texture copies of a buffer that is about to change (or to be freed).
    fn forget_textures(st: &mut State, buffer_serial: u64) {
        if !st.texture_cache.is_empty() {
            st.texture_cache.retain(|k, _| k.0 != buffer_serial);
        }
    }

    /// A texture's drop: never locks `state` (see `returned_textures`).
    fn release_texture(&self, raw: TextureAndView, rows: u32, serial: u64) {
        self.texture_live_bytes.fetch_sub(rows as u64 * TEX_ROW_TEXELS as u64 * 16, std::sync::atomic::Ordering::Relaxed);
        self.returned_textures.lock().unwrap_or_else(|e| e.into_inner()).push((rows, serial, raw));
    }

    fn release(&self, raw: wgpu::Buffer, class: u64, serial: u64) {
        let mut st = self.lock();
        Self::forget_textures(&mut st, serial);
        st.stats.live_bytes = st.stats.live_bytes.saturating_sub(class);
        if st.encoder.is_some() {
            st.quarantine.push((raw, class, serial));
        } else {
            st.pool.entry(class).or_default().insert(serial, raw);
        }
    }

    /// Uploads bytes into a fresh pooled buffer. Pool buffers are never read by pending work (see `quarantine`),
    /// so the write can be staged on the queue directly.
    pub fn upload(&self, data: &[u8], what: &str) -> Result<BufView> {
        let view = self.alloc(data.len() as u64, what)?;
        self.write_staged(&view, data);
        Ok(view)
    }

    /// Overwrites an existing view with host bytes. Pending dispatches may read it, and a queue write would land
    /// before them, so the open recording is submitted first.
    pub fn write(&self, view: &BufView, data: &[u8]) -> Result<()> {
        self.check_device(view, "a host write")?;
        if data.len() as u64 > view.bytes {
            return Err(GpuError::Readback(format!("write of {} bytes into a view of {} bytes", data.len(), view.bytes)));
        }
        self.flush()?;
        self.write_staged(view, data);
        Ok(())
    }

    fn write_staged(&self, view: &BufView, data: &[u8]) {
        Self::forget_textures(&mut self.lock(), view.buffer.serial);
        if data.len() % 4 == 0 {
            self.queue.write_buffer(view.buffer.raw(), view.offset, data);
        } else {
            let mut padded = data.to_vec();
            padded.resize(data.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(view.buffer.raw(), view.offset, &padded);
        }
    }

    fn module(&self, st: &mut State, shader: &'static Shader) -> Result<()> {
        if st.modules.contains_key(&shader.key()) {
            return Ok(());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor { label: Some(shader.name), source: wgpu::ShaderSource::Wgsl(shader.source.into()) };
        // Bounds checks stay on; the loop counters wgpu adds against infinite loops in untrusted shaders are
        // dropped: they cost issue slots in every iteration of the hot loops (matmul's k loop) and can keep a
        // driver from unrolling them.
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = shader.loop_checks;
        // SAFETY: bounds checks are always on. Loop counters are dropped only from Kiln's own shaders (`shaders/`,
        // `loop_checks: false`), where every loop ends: each steps by a positive constant (or halves a positive
        // stride) towards a bound taken from its params, never a `loop {}`. Other shaders keep them.
        let m = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader { shader: shader.name.into(), entry: "(module)".into(), message: e.to_string() });
        }
        st.modules.insert(shader.key(), m);
        Ok(())
    }

    fn layout(&self, st: &mut State, (inputs, outputs, textures): LayoutKey) {
        st.layouts.entry((inputs, outputs, textures)).or_insert_with(|| {
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: true, min_binding_size: None },
                count: None,
            }];
            for i in 0..inputs + outputs {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: 1 + i as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: i < inputs },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                });
            }
            for i in 0..textures {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: (1 + inputs + outputs + i) as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: false },
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    count: None,
                });
            }
            let bgl = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &entries });
            let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
            (bgl, pl)
        });
    }

    /// Creates (once) the pipeline for a dispatch's shader, entry and constants.
    fn pipeline(&self, st: &mut State, d: &Dispatch) -> Result<PipelineKey> {
        let key = PipelineKey {
            shader: d.shader.key(),
            entry: d.entry,
            constants: d.constants.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
            inputs: d.inputs.len(),
            outputs: d.outputs.len(),
            textures: d.textures.len(),
        };
        if st.pipelines.contains_key(&key) {
            return Ok(key);
        }
        self.module(st, d.shader)?;
        self.layout(st, key.layout());
        if let Some(dir) = &self.dump_dir {
            self.dump(dir, d)?;
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(d.entry),
            layout: Some(&st.layouts[&key.layout()].1),
            module: &st.modules[&d.shader.key()],
            entry_point: Some(d.entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: d.constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader { shader: d.shader.name.into(), entry: d.entry.into(), message: e.to_string() });
        }
        if self.log {
            eprintln!("[kiln] pipeline {}::{} {:?}", d.shader.name, d.entry, d.constants);
        }
        st.stats.pipelines_created += 1;
        st.pipelines.insert(key.clone(), p);
        Ok(key)
    }

    fn dump(&self, dir: &std::path::Path, d: &Dispatch) -> Result<()> {
        let consts: String = d.constants.iter().map(|(n, v)| format!(".{n}={v}")).collect();
        let path = dir.join(format!("{}.{}{}.wgsl", d.shader.name.trim_end_matches(".wgsl"), d.entry, consts));
        let header: String = d.constants.iter().map(|(n, v)| format!("// override {n} = {v}\n")).collect();
        let err = |e: std::io::Error| GpuError::Dump { path: path.display().to_string(), message: e.to_string() };
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::write(&path, format!("// entry point: {}\n{header}{}", d.entry, d.shader.source)).map_err(err)
    }

    fn encoder<'s>(&self, st: &'s mut State) -> &'s mut wgpu::CommandEncoder {
        st.encoder.get_or_insert_with(|| self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln step") }))
    }

    /// Opens a compute pass. Under `gpu_time_ms` every pass writes a timestamp when it starts and when it ends
    /// (copies between passes fall inside the span from the first start to the last end).
    fn open_pass(&self, st: &mut State) {
        let query_set = if st.timestamps_armed && st.timed_passes < TIMED_PASSES { st.query_set.clone() } else { None };
        let slot = 2 * st.timed_passes;
        let timestamp_writes = query_set.as_ref().map(|qs| wgpu::ComputePassTimestampWrites { query_set: qs, beginning_of_pass_write_index: Some(slot), end_of_pass_write_index: Some(slot + 1) });
        if timestamp_writes.is_some() {
            st.timed_passes += 1;
        } else if st.timestamps_armed {
            // More passes than slots: the span would end too early, so this call reports no time.
            st.timestamps_armed = false;
            st.timed_passes = 0;
        }
        let pass = self.encoder(st).begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
        st.pass = Some(pass.forget_lifetime());
    }

    fn end_pass(st: &mut State) {
        st.pass = None;
    }

    /// Records one dispatch into the open compute pass.
    pub fn dispatch(&self, d: &Dispatch) -> Result<()> {
        let limit = self.max_binding_bytes();
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        for v in d.inputs.iter().chain(d.outputs) {
            if v.buffer.device.id != self.id {
                self.check_device(v, &format!("{}::{}", d.shader.name, d.entry))?;
            }
            if v.bytes > limit {
                return Err(GpuError::BindingTooLarge { bytes: v.bytes, limit, what: format!("{}::{}", d.shader.name, d.entry) });
            }
            if v.offset % align != 0 {
                return Err(GpuError::Validation { context: format!("{}::{}", d.shader.name, d.entry), message: format!("a binding at byte offset {} breaks this adapter's min_storage_buffer_offset_alignment of {align}", v.offset) });
            }
        }
        if let Some(t) = d.textures.iter().find(|t| t.texture.device_id != self.id) {
            return Err(GpuError::CrossDevice { what: format!("{}::{} (a texture copy)", d.shader.name, d.entry), a: self.describe(), b: format!("device #{}", t.texture.device_id) });
        }
        let params = pad16(d.params);
        if params.len() as u64 > PARAMS_WINDOW {
            return Err(GpuError::Validation { context: format!("{}::{}", d.shader.name, d.entry), message: format!("params of {} bytes exceed the {PARAMS_WINDOW}-byte window", params.len()) });
        }
        let align = (self.limits.min_uniform_buffer_offset_alignment as usize).max(16);
        let mut st = self.lock();
        if (st.ring_host.len().div_ceil(align) * align) as u64 + PARAMS_WINDOW > RING_BYTES {
            drop(st);
            self.flush()?;
            st = self.lock();
        }
        let key = self.pipeline(&mut st, d)?;
        for v in d.outputs {
            Self::forget_textures(&mut st, v.buffer.serial);
        }
        let offset = st.ring_host.len().div_ceil(align) * align;
        st.ring_host.resize(offset, 0);
        st.ring_host.extend_from_slice(&params);

        let bind_key = BindKey {
            layout: key.layout(),
            ranges: d.inputs.iter().chain(d.outputs).map(|v| (v.buffer.raw().clone(), v.offset, v.bytes.max(4))).collect(),
            textures: d.textures.iter().map(|t| t.texture.raw().0.clone()).collect(),
        };
        let bind_group = match st.bind_groups.get(&bind_key) {
            Some(bg) => bg.clone(),
            None => {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &st.ring, offset: 0, size: wgpu::BufferSize::new(PARAMS_WINDOW) }),
                }];
                for (i, (buffer, offset, bytes)) in bind_key.ranges.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 1 + i as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer, offset: *offset, size: wgpu::BufferSize::new(*bytes) }),
                    });
                }
                let first_texture = 1 + bind_key.ranges.len() as u32;
                for (i, t) in d.textures.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry { binding: first_texture + i as u32, resource: wgpu::BindingResource::TextureView(&t.texture.raw().1) });
                }
                let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &st.layouts[&key.layout()].0, entries: &entries });
                if st.bind_groups.len() >= BIND_GROUP_CACHE {
                    st.bind_groups.clear();
                }
                st.bind_groups.insert(bind_key, bg.clone());
                st.stats.bind_groups_created += 1;
                bump_thread(|t| t.bind_groups_created += 1);
                bg
            }
        };
        let profiled = self.profiling.load(std::sync::atomic::Ordering::Relaxed) && self.features.contains(wgpu::Features::TIMESTAMP_QUERY);
        if profiled {
            if st.profile.pending.len() as u32 >= PROFILE_SLOTS {
                drop(st);
                self.flush()?;
                st = self.lock();
            }
            Self::end_pass(&mut st);
            if st.profile.query_set.is_none() {
                st.profile.query_set = Some(self.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("kiln profile"), ty: wgpu::QueryType::Timestamp, count: 2 * PROFILE_SLOTS }));
            }
            let slot = 2 * st.profile.pending.len() as u32;
            let consts: String = d.constants.iter().map(|(n, v)| format!(" {n}={v}")).collect();
            st.profile.pending.push(format!("{}::{}{consts}", d.shader.name.trim_end_matches(".wgsl"), d.entry));
            let qs = st.profile.query_set.clone().expect("created above");
            let writes = wgpu::ComputePassTimestampWrites { query_set: &qs, beginning_of_pass_write_index: Some(slot), end_of_pass_write_index: Some(slot + 1) };
            let pass = self.encoder(&mut st).begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: Some(writes) });
            st.pass = Some(pass.forget_lifetime());
        }
        if st.pass.is_none() {
            self.open_pass(&mut st);
        }
        let pipeline = st.pipelines[&key].clone();
        let pass = st.pass.as_mut().expect("pass opened above");
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[offset as u32]);
        let [x, y, z] = d.workgroups;
        if x > 0 && y > 0 && z > 0 {
            pass.dispatch_workgroups(x, y, z);
        }
        if profiled {
            Self::end_pass(&mut st);
        }
        st.stats.dispatches += 1;
        st.recorded_ops += 1;
        bump_thread(|t| t.dispatches += 1);
        Ok(())
    }

    /// Records a buffer-to-buffer copy (sizes and offsets multiples of 4).
    pub fn copy(&self, src: &BufView, dst: &BufView, bytes: u64) -> Result<()> {
        self.check_device(src, "a copy's source")?;
        self.check_device(dst, "a copy's destination")?;
        let mut st = self.lock();
        Self::forget_textures(&mut st, dst.buffer.serial);
        Self::end_pass(&mut st);
        self.encoder(&mut st).copy_buffer_to_buffer(src.buffer.raw(), src.offset, dst.buffer.raw(), dst.offset, bytes);
        st.recorded_ops += 1;
        Ok(())
    }

    /// Records a fill with zeros.
    pub fn zero(&self, view: &BufView) -> Result<()> {
        self.check_device(view, "a fill")?;
        let mut st = self.lock();
        Self::forget_textures(&mut st, view.buffer.serial);
        Self::end_pass(&mut st);
        self.encoder(&mut st).clear_buffer(view.buffer.raw(), view.offset, Some(view.bytes.div_ceil(4) * 4));
        st.recorded_ops += 1;
        Ok(())
    }

    /// Finishes and submits the open recording (if any). Returns the submission index.
    pub fn flush(&self) -> Result<Option<wgpu::SubmissionIndex>> {
        let mut st = self.lock();
        Self::end_pass(&mut st);
        let profiled = std::mem::take(&mut st.profile.pending);
        let mut profile_readback = None;
        if !profiled.is_empty() {
            let n = 2 * profiled.len() as u64;
            let usage = |u| wgpu::BufferDescriptor { label: Some("kiln profile"), size: 8 * n, usage: u, mapped_at_creation: false };
            let resolved = self.device.create_buffer(&usage(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC));
            let readback = self.device.create_buffer(&usage(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST));
            let qs = st.profile.query_set.clone().expect("set up by dispatch");
            let enc = self.encoder(&mut st);
            enc.resolve_query_set(&qs, 0..n as u32, &resolved, 0);
            enc.copy_buffer_to_buffer(&resolved, 0, &readback, 0, 8 * n);
            profile_readback = Some(readback);
        }
        let Some(encoder) = st.encoder.take() else {
            return Ok(None);
        };
        if !st.ring_host.is_empty() {
            self.queue.write_buffer(&st.ring, 0, &st.ring_host);
            st.ring_host.clear();
        }
        let ops = std::mem::take(&mut st.recorded_ops);
        let index = self.queue.submit([encoder.finish()]);
        st.stats.submits += 1;
        count_thread(1, 0, 0);
        for (raw, class, serial) in std::mem::take(&mut st.quarantine) {
            st.pool.entry(class).or_default().insert(serial, raw);
        }
        drop(st);
        if self.log {
            eprintln!("[kiln] submit: {ops} recorded commands");
        }
        self.check_errors(&format!("a submit of {ops} commands"))?;
        if let Some(readback) = profile_readback {
            self.collect_profile(&readback, profiled)?;
        }
        Ok(Some(index))
    }

    /// Waits for the submitted copy of resolved timestamps into `readback` and returns them.
    fn read_timestamps(&self, readback: &wgpu::Buffer) -> Result<Vec<u64>> {
        let (tx, rx) = std::sync::mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Poll(e.to_string()))?;
        rx.recv().map_err(|e| GpuError::Poll(e.to_string()))?.map_err(|e| GpuError::Poll(e.to_string()))?;
        let ticks = {
            let view = readback.get_mapped_range(..).map_err(|e| GpuError::Poll(e.to_string()))?;
            view.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
        };
        readback.unmap();
        Ok(ticks)
    }

    /// Waits for a profiled submit and adds each dispatch's time to its kernel's total.
    fn collect_profile(&self, readback: &wgpu::Buffer, kernels: Vec<String>) -> Result<()> {
        let ticks = self.read_timestamps(readback)?;
        let period = self.queue.get_timestamp_period() as f64;
        let mut st = self.lock();
        for (kernel, t) in kernels.into_iter().zip(ticks.chunks_exact(2)) {
            let entry = st.profile.totals.entry(kernel).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += t[1].saturating_sub(t[0]) as f64 * period / 1e6;
        }
        Ok(())
    }

    /// Turns per-dispatch profiling on or off (also `KILN_PROFILE=1`). While on, each dispatch runs in a compute
    /// pass of its own between two timestamps and each submit waits for its timings: slower, for finding where
    /// a step's time goes, not for timing it. `gpu_time_ms` reports None while it is on.
    pub fn set_profiling(&self, on: bool) {
        self.profiling.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn profiling(&self) -> bool {
        self.profiling.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The per-kernel GPU time gathered since the last call, slowest first; clears it.
    pub fn profile_take(&self) -> Result<Vec<KernelTime>> {
        self.flush()?;
        let totals = std::mem::take(&mut self.lock().profile.totals);
        let mut out: Vec<KernelTime> = totals.into_iter().map(|(kernel, (dispatches, ms))| KernelTime { kernel, dispatches, ms }).collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(out)
    }

    fn check_errors(&self, context: &str) -> Result<()> {
        if let Some(message) = self.uncaptured.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(GpuError::Validation { context: context.into(), message });
        }
        Ok(())
    }

    /// Blocks until all submitted work is done.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Poll(e.to_string()))?;
        Ok(())
    }

    /// Runs `f` (which records dispatches and copies) and returns the GPU time from the start of the first
    /// compute pass, opened before `f` records anything, to the end of the last, in ms; waits for it. None where
    /// the adapter has no TIMESTAMP_QUERY, `f` submitted on its own or opened more than 64 passes (then only wall
    /// time around a fence can tell), or under profiling.
    pub fn gpu_time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<Option<f64>> {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) || self.profiling() {
            f()?;
            self.sync()?;
            return Ok(None);
        }
        self.flush()?;
        let submits = {
            let mut st = self.lock();
            if st.query_set.is_none() {
                st.query_set = Some(self.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("kiln timestamps"), ty: wgpu::QueryType::Timestamp, count: 2 * TIMED_PASSES }));
            }
            st.timestamps_armed = true;
            st.timed_passes = 0;
            // A pass opened now starts the span before anything `f` records (copies included).
            self.open_pass(&mut st);
            st.stats.submits
        };
        let ran = f();
        let bytes = 16 * TIMED_PASSES as u64;
        let usage = |u| wgpu::BufferDescriptor { label: Some("kiln timestamps"), size: bytes, usage: u, mapped_at_creation: false };
        let resolved = self.device.create_buffer(&usage(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC));
        let readback = self.device.create_buffer(&usage(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST));
        let (timed, passes) = {
            let mut st = self.lock();
            let passes = std::mem::take(&mut st.timed_passes);
            let timed = st.timestamps_armed && passes > 0 && st.stats.submits == submits;
            st.timestamps_armed = false;
            Self::end_pass(&mut st);
            if timed {
                let qs = st.query_set.clone().expect("created above");
                let enc = self.encoder(&mut st);
                enc.resolve_query_set(&qs, 0..2 * passes, &resolved, 0);
                enc.copy_buffer_to_buffer(&resolved, 0, &readback, 0, 16 * passes as u64);
            }
            (timed, passes as usize)
        };
        self.sync()?;
        ran?;
        if !timed {
            return Ok(None);
        }
        let ticks = self.read_timestamps(&readback)?;
        let ns = ticks[2 * passes - 1].saturating_sub(ticks[0]) as f64 * self.queue.get_timestamp_period() as f64;
        Ok(Some(ns / 1e6))
    }

    /// Starts reading `view` back: records the copy into a mappable buffer and submits. The returned handle is
    /// completed by [`Readback::wait`] (blocking) or by awaiting [`Readback::into_future`] (async).
    pub fn read_start(&self, view: &BufView) -> Result<Readback> {
        self.check_device(view, "a readback")?;
        let bytes = view.bytes.div_ceil(4) * 4;
        let class = size_class(bytes);
        let staging = {
            let mut st = self.lock();
            let b = match st.readback_pool.get_mut(&class).and_then(Vec::pop) {
                Some(b) => b,
                None => {
                    st.stats.buffers_created += 1;
                    st.stats.bytes_created += class;
                    count_thread(0, 1, class);
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("kiln readback"),
                        size: class,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                }
            };
            Self::end_pass(&mut st);
            self.encoder(&mut st).copy_buffer_to_buffer(view.buffer.raw(), view.offset, &b, 0, bytes);
            st.recorded_ops += 1;
            b
        };
        self.flush()?;
        let done = Arc::new(Mutex::new(ReadState::default()));
        let sink = done.clone();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
            s.result = Some(r.map_err(|e| e.to_string()));
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        });
        Ok(Readback { gpu: self.handle(), staging: Some(staging), class, bytes: view.bytes, done })
    }

    /// Blocking read of a view's bytes.
    pub fn read(&self, view: &BufView) -> Result<Vec<u8>> {
        self.read_start(view)?.wait()
    }

    fn finish_read(&self, staging: wgpu::Buffer, class: u64, bytes: u64) -> Result<Vec<u8>> {
        let out = {
            let range = staging.get_mapped_range(0..bytes.div_ceil(4) * 4).map_err(|e| GpuError::Readback(e.to_string()))?;
            range[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.lock().readback_pool.entry(class).or_default().push(staging);
        Ok(out)
    }
}

#[derive(Default)]
struct ReadState {
    result: Option<std::result::Result<(), String>>,
    waker: Option<std::task::Waker>,
}

/// A readback in flight.
pub struct Readback {
    gpu: Device,
    staging: Option<wgpu::Buffer>,
    class: u64,
    bytes: u64,
    done: Arc<Mutex<ReadState>>,
}

impl Readback {
    fn take_result(&self) -> Option<std::result::Result<(), String>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).result.take()
    }

    fn complete(&mut self, r: std::result::Result<(), String>) -> Result<Vec<u8>> {
        r.map_err(GpuError::Readback)?;
        let staging = self.staging.take().expect("readback completed once");
        self.gpu.finish_read(staging, self.class, self.bytes)
    }

    /// Blocks until the bytes are on the host.
    pub fn wait(mut self) -> Result<Vec<u8>> {
        loop {
            if let Some(r) = self.take_result() {
                return self.complete(r);
            }
            self.gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Poll(e.to_string()))?;
        }
    }

    /// Non-blocking check: `Some(bytes)` once the copy has landed. Drives the device with a non-blocking poll.
    pub fn try_get(&mut self) -> Option<Result<Vec<u8>>> {
        if let Err(e) = self.gpu.device.poll(wgpu::PollType::Poll) {
            return Some(Err(GpuError::Poll(e.to_string())));
        }
        self.take_result().map(|r| self.complete(r))
    }
}

impl std::future::Future for Readback {
    type Output = Result<Vec<u8>>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        if let Some(r) = self.try_get() {
            return std::task::Poll::Ready(r);
        }
        self.done.lock().unwrap_or_else(|e| e.into_inner()).waker = Some(cx.waker().clone());
        // Native wgpu completes maps only when polled; ask to be polled again (on the web the browser drives it).
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Workgroup counts covering `threads` invocations of `wg`-sized groups, spread over x and y when x would
/// exceed the 65535 limit. Kernels compute the linear index as `gid.x + gid.y * num_workgroups.x * WG`.
pub fn grid_1d(threads: u64, wg: u32) -> [u32; 3] {
    let groups = threads.div_ceil(wg as u64).max(1);
    if groups <= 65535 {
        [groups as u32, 1, 1]
    } else {
        let y = groups.div_ceil(65535);
        [groups.div_ceil(y) as u32, y as u32, 1]
    }
}
