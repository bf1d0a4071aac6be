//! Device handles: opening a device on an adapter, the default device, the thread's current device.

use super::*;

pub(super) static GPU: OnceLock<Device> = OnceLock::new();

pub(super) static INIT: Mutex<()> = Mutex::new(());

pub(super) static NEXT_DEVICE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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
pub struct Device(pub(super) Arc<Gpu>);

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

pub(super) static CHOICE: Mutex<Option<String>> = Mutex::new(None);

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

impl Gpu {
    pub(super) fn new(wanted: Option<&str>, options: &DeviceOptions) -> Result<Gpu> {
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
}
