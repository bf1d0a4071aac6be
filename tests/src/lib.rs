//! Helpers shared by Kiln's test suite: the adapter check, seeded random inputs, and the forward/backward check
//! of an op against the CPU reference and central finite differences.

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
    for key in ["fusion", "texture_reads", "conv_implicit"] {
        dev.set_setting(key, None);
    }
    result.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A fresh seed each run (printed, so a failure can be replayed with KILN_TEST_SEED).
pub fn test_rng(name: &str) -> Rng {
    let seed = std::env::var("KILN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7)
    });
    eprintln!("[{name}] KILN_TEST_SEED={seed}");
    Rng::new(seed)
}

/// Where an op's random inputs are drawn from.
#[derive(Clone, Copy, Debug)]
pub enum Domain {
    /// Uniform in [-2, 2).
    Any,
    /// Uniform in [0.2, 2): log, sqrt, fractional powers, divisors.
    Positive,
    /// |x| in [0.1, 2): away from the kink of relu/abs and from ties.
    AwayFromZero,
}

pub fn random_values(n: usize, domain: Domain, rng: &mut Rng) -> Vec<f64> {
    (0..n)
        .map(|_| match domain {
            Domain::Any => rng.range(-2.0, 2.0),
            Domain::Positive => rng.range(0.2, 2.0),
            Domain::AwayFromZero => {
                let v = rng.range(0.1, 2.0);
                if rng.uniform() < 0.5 { -v } else { v }
            }
        })
        .collect()
}

pub fn to_gpu(t: &CpuTensor) -> Tensor {
    Tensor::from_slice(&t.to_f32(), &t.shape).expect("upload")
}

/// max |a - b| / (|b| + scale * tol_floor) over elements; panics with a report over `tol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    let mut worst = (0.0, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / (w.abs() + 0.01 * scale + 1e-6);
        if err > worst.0 || err.is_nan() {
            worst = (if err.is_nan() { f64::INFINITY } else { err }, i);
        }
    }
    assert!(worst.0 <= tol, "{what}: relative error {:.3e} > {tol:.0e} at {} (got {}, want {})", worst.0, worst.1, got[worst.1], want[worst.1]);
}

/// Checks an op: GPU forward against the CPU reference, then every input's GPU gradient against central
/// finite differences of the f64 CPU reference. The scalar taken is sum(op(x) * r) with random r.
pub fn check_op(name: &str, inputs: &[(&[usize], Domain)], gpu_op: impl Fn(&[Tensor]) -> Result<Tensor>, cpu_op: impl Fn(&[CpuTensor]) -> CpuTensor) {
    require_gpu();
    let mut rng = test_rng(name);
    let cpu_inputs: Vec<CpuTensor> = inputs.iter().map(|(shape, d)| CpuTensor::new(random_values(kiln_graph::shape::numel(shape), *d, &mut rng), shape)).collect();
    // The GPU sees the f32-rounded values; the reference uses the same rounded values.
    let cpu_inputs: Vec<CpuTensor> = cpu_inputs.iter().map(|t| CpuTensor::from_f32(&t.to_f32(), &t.shape)).collect();
    let vars: Vec<Tensor> = cpu_inputs.iter().map(|t| to_gpu(t).var()).collect();

    let y = gpu_op(&vars).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let want = cpu_op(&cpu_inputs);
    assert_eq!(y.shape(), &want.shape[..], "{name}: output shape");
    assert_close(&format!("{name} forward"), &y.to_vec().expect("readback"), &want.data, 1e-4);

    let r = CpuTensor::new(random_values(want.data.len(), Domain::Any, &mut rng), &want.shape);
    let r = CpuTensor::from_f32(&r.to_f32(), &r.shape);
    let loss = y.mul(&to_gpu(&r)).and_then(|t| t.sum_all()).expect("loss");
    let grads = loss.backward().unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));
    let objective = |xs: &[CpuTensor]| -> f64 { cpu_op(xs).data.iter().zip(&r.data).map(|(a, b)| a * b).sum() };

    for (i, var) in vars.iter().enumerate() {
        let g = grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient for input {i}")).to_vec().expect("grad readback");
        let n = cpu_inputs[i].data.len();
        // Every element for small inputs, a random sample of 48 for large ones.
        let picks: Vec<usize> = if n <= 256 { (0..n).collect() } else { (0..48).map(|_| rng.below(n)).collect() };
        let eps = 1e-5;
        let mut fd = Vec::with_capacity(picks.len());
        for &j in &picks {
            let mut xs = cpu_inputs.clone();
            xs[i].data[j] += eps;
            let up = objective(&xs);
            xs[i].data[j] -= 2.0 * eps;
            let down = objective(&xs);
            fd.push((up - down) / (2.0 * eps));
        }
        let got: Vec<f32> = picks.iter().map(|&j| g[j]).collect();
        assert_close(&format!("{name} d/d(input {i}) vs finite differences"), &got, &fd, 2e-3);
    }
}
