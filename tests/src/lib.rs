//! Helpers shared by Kiln's test suite: the adapter check, seeded random inputs, and the forward/backward check
//! of an op against the CPU reference and central finite differences.

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

use kiln_graph::cpu::CpuTensor;
use kiln_graph::{Result, Rng, Tensor};

/// The GPU the tests run on. Never skips: with no adapter the test fails and says how to get one; with
/// `CI=true` the adapter must be Vulkan (lavapipe on CI), never the slow GL fallback.
pub fn require_gpu() -> &'static kiln_graph::backend::Gpu {
    let gpu = match kiln_graph::backend::gpu() {
        Ok(g) => g,
        Err(e) => panic!("GPU tests need an adapter and none was found: {e}"),
    };
    // Tests run the fixed per-adapter kernels (fast and deterministic); tuning is tested on its own. A
    // setting of the default device, not the environment: nothing here changes process-wide state.
    if std::env::var_os("KILN_AUTOTUNE").is_none() {
        kiln_graph::tune::set_mode(gpu, Some(kiln_graph::tune::Mode::Off));
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) && gpu.backend() != "Vulkan" {
        panic!("CI=true but the adapter is {} (backend {}), not Vulkan: install mesa-vulkan-drivers and set WGPU_BACKEND=vulkan", gpu.adapter_name(), gpu.backend());
    }
    gpu
}

/// A second device of this test binary on the default device's adapter, opened once, for the tests that
/// change a device's settings (fusion, texture reads, convolution lowering): `with_settings_device` runs them
/// one at a time on it, so the default device, which the other tests share, never changes under them.
fn settings_device() -> &'static kiln_graph::backend::Device {
    static DEVICE: std::sync::OnceLock<kiln_graph::backend::Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(|| {
        let adapter = require_gpu().info.name.clone();
        let d = kiln_graph::backend::Device::open(&kiln_graph::backend::DeviceOptions { adapter: Some(adapter), ..Default::default() }).expect("a second device on the same adapter");
        kiln_graph::tune::set_mode(&d, Some(kiln_graph::tune::Mode::Off));
        d
    })
}

/// Runs `f` on the settings device (as the thread's current device, so tensors made inside go there), one
/// test at a time; every setting `f` changed is cleared afterwards, even when `f` panics.
pub fn with_settings_device<T>(f: impl FnOnce(&kiln_graph::backend::Device) -> T) -> T {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dev = settings_device();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dev.scope(|| f(dev))));
    for key in ["fusion", "texture_reads", "conv_implicit", "attention_tiles", "attention_fused"] {
        dev.set_setting(key, None);
    }
    result.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A fresh seed each run (printed, so a failure can be replayed with KILN_TEST_SEED).
pub fn test_rng(name: &str) -> Rng {
    let seed = std::env::var("KILN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7));
    eprintln!("[{name}] KILN_TEST_SEED={seed}");
    Rng::new(seed)
}

pub use kiln_graph::gradcheck::{random_values, Domain};

pub fn to_gpu(t: &CpuTensor) -> Tensor {
    Tensor::from_slice(&t.to_f32(), &t.shape).expect("upload")
}

/// max |a - b| / (|b| + 1% of max |b|) over elements; panics with a report over `tol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    if let Err(e) = kiln_graph::gradcheck::check_close(what, got, want, tol) {
        panic!("{e}");
    }
}

/// Checks an op with the public [`kiln_graph::gradcheck::gradcheck`] (GPU forward against the CPU reference,
/// every input's GPU gradient against central finite differences of the f64 reference), on a fresh seed.
pub fn check_op(name: &str, inputs: &[(&[usize], Domain)], gpu_op: impl Fn(&[Tensor]) -> Result<Tensor>, cpu_op: impl Fn(&[CpuTensor]) -> CpuTensor) {
    check_op_with(name, inputs, Default::default(), gpu_op, cpu_op)
}

/// [`check_op`] with tolerances of its own (an op whose f32 forward loses digits by design, said at the call).
pub fn check_op_with(name: &str, inputs: &[(&[usize], Domain)], tol: kiln_graph::gradcheck::Tolerance, gpu_op: impl Fn(&[Tensor]) -> Result<Tensor>, cpu_op: impl Fn(&[CpuTensor]) -> CpuTensor) {
    require_gpu();
    let mut rng = test_rng(name);
    if let Err(e) = kiln_graph::gradcheck::gradcheck(name, inputs, &mut rng, tol, gpu_op, cpu_op) {
        panic!("{e}");
    }
}

/// A net loaded from its checkpoint, in evaluation mode (batch norm's running statistics), gives the trained
/// net's outputs for one random picture [3, side, side], whether that picture comes alone or first of two.
pub fn assert_loaded_matches_trained(what: &str, side: usize, trained: impl Fn(&Tensor) -> Result<Tensor>, loaded: impl Fn(&Tensor) -> Result<Tensor>) {
    let mut rng = test_rng(what);
    let px: Vec<f32> = (0..2 * 3 * side * side).map(|_| rng.uniform() as f32).collect();
    let both = Tensor::from_slice(&px, &[2, 3, side, side]).unwrap();
    let first = Tensor::from_slice(&px[..3 * side * side], &[1, 3, side, side]).unwrap();
    let a = kiln_graph::no_grad(|| trained(&both)).unwrap().to_vec().unwrap();
    let b = kiln_graph::no_grad(|| loaded(&first)).unwrap().to_vec().unwrap();
    let want: Vec<f64> = a[..b.len()].iter().map(|&v| v as f64).collect();
    assert_close(what, &b, &want, 1e-5);
}
