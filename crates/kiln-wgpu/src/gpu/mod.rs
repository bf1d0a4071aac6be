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

mod device;
mod pool;
mod profile;
mod readback;
mod record;

pub use device::{gpu, select_adapter, Device, DeviceOptions};
use pool::*;
pub use pool::{BufView, PooledBuffer, PooledTexture, TexView, TEX_ROW_TEXELS};
pub use profile::KernelTime;
use profile::*;
pub use readback::Readback;
use record::*;

/// A WGSL source, compiled once per device. Kiln's own (`shaders/`) are trusted: wgpu's loop-bound counters are
/// left out of them (see `module`). A crate's own kernels are made with [`Shader::new`], which keeps them.
/// Each `static` is its own module: two shaders never share a cache entry, whatever their names.
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
    /// Whether wgpu's counters that stop a runaway loop stay in (false only through `Shader::trusted`).
    loop_checks: bool,
}

impl Shader {
    /// A shader from outside Kiln (a custom op's kernels): compiled with every runtime check wgpu has.
    pub const fn new(name: &'static str, source: &'static str) -> Shader {
        Shader { name, source, loop_checks: true }
    }

    /// A shader compiled without wgpu's loop-bound counters (Kiln's own, `shaders/`).
    ///
    /// # Safety
    /// Every loop in `source` must end for any params a dispatch may pass: a runaway loop without the counters
    /// can hang the GPU.
    pub const unsafe fn trusted(name: &'static str, source: &'static str) -> Shader {
        Shader { name, source, loop_checks: false }
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

const RING_BYTES: u64 = 4 << 20;

/// The uniform window each dispatch's bind group sees of the params ring, at a dynamic offset: every params
/// struct fits in it, and it lets one bind group serve every dispatch on the same buffers.
const PARAMS_WINDOW: u64 = 256;

/// Bind groups kept for reuse; past this many the cache starts over (they hold pooled buffers, never freed
/// ones, so the bound only limits host memory).
const BIND_GROUP_CACHE: usize = 16384;

const MIN_CLASS: u64 = 256;

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

impl Gpu {
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
}
