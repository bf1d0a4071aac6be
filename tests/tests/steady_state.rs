//! A training step after the first allocates nothing: the pool serves every buffer. Its own test binary, so no
//! other test shares the buffer pool while it runs.

use kiln_models::{run, TrainConfig};

/// The tests here count what the process's pool and caches do, so they take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn mlp_steps_allocate_nothing_after_warm_up_and_submit_once() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    kiln_tests::require_gpu();
    let r = run(&TrainConfig { epochs: Some(3), ..TrainConfig::new("mlp", "digits") }, |_| {}).unwrap();
    assert_eq!(r.buffers_created_after_first_step, 0, "steps after the first of each batch size created GPU buffers");
    assert!(r.submits_per_step.expect("measured") <= 2.0, "{:?} submits per step", r.submits_per_step);
    assert!(r.peak_gpu_bytes > 0);
}

#[test]
fn repeated_steps_reuse_every_bind_group() {
    // Same shapes each step: the pool hands back the same buffers in the same order, so after warm-up every
    // dispatch finds its bind group in the cache (the step is replayed on reused pipelines, bind groups and
    // buffers; only the params differ).
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    kiln_tests::require_gpu();
    let b = kiln_benches::step::bench_step("lenet", [1, 28, 28], 10, 16, 10).unwrap();
    assert_eq!(b.bind_groups_per_step, 0.0, "bind groups created per step after warm-up");
    assert_eq!(b.buffers_created_after_first_step, 0);
    // Reuse inside a step: a step hands out more bytes (buffers and texture copies) than its working set ever
    // holds at once: memory goes back to the pools at each tensor's last use and is handed out again within the
    // step (LeNet on lavapipe: 8.3 MB handed out per step, working set at most 5.6 MB).
    assert!(b.step_peak_bytes > 0);
    assert!(b.bytes_handed_out_per_step > 1.2 * b.step_peak_bytes as f64, "{} bytes handed out per step, working-set peak {}", b.bytes_handed_out_per_step, b.step_peak_bytes);
}

#[test]
fn profiling_times_every_dispatch_by_kernel() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let g = kiln_tests::require_gpu();
    if !g.features.contains(kiln_graph::backend::wgpu::Features::TIMESTAMP_QUERY) {
        return; // no timestamps on this adapter: profiling records nothing (and says so in `kiln bench`)
    }
    g.set_profiling(true);
    g.profile_take().unwrap();
    let before = kiln_graph::backend::thread_stats().dispatches;
    let b = kiln_benches::step::bench_step("mlp", [1, 28, 28], 10, 16, 10);
    let after = kiln_graph::backend::thread_stats().dispatches;
    g.set_profiling(false);
    let b = b.unwrap();
    // The timed steps' kernels: matmuls and the optimizer among them, each dispatch counted once.
    let names: Vec<&str> = b.kernels.iter().map(|k| k.kernel.as_str()).collect();
    assert!(names.iter().any(|k| k.starts_with("matmul")), "{names:?}");
    assert!(names.iter().any(|k| k.starts_with("optim::adam_step")), "{names:?}");
    let per_step: f64 = b.kernels.iter().map(|k| k.dispatches_per_step).sum();
    let all_steps = (after - before) as f64; // 2 warm-up + 10 timed steps
    assert!((per_step * 12.0 - all_steps).abs() < 1e-6, "{per_step} dispatches per timed step, {all_steps} in 12 steps");
    assert!(b.kernels.iter().all(|k| k.ms_per_step > 0.0), "{:?}", b.kernels);
}
