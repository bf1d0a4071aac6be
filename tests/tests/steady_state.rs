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
    assert!(r.submits_per_step <= 2.0, "{} submits per step", r.submits_per_step);
    assert!(r.peak_gpu_bytes > 0);
}

#[test]
fn repeated_steps_reuse_every_bind_group() {
    // Same shapes each step: the pool hands back the same buffers in the same order, so after warm-up every
    // dispatch finds its bind group in the cache (the step is replayed on reused pipelines, bind groups and
    // buffers; only the params differ).
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    kiln_tests::require_gpu();
    let b = kiln_models::bench::bench_step("lenet", [1, 28, 28], 10, 16, 10).unwrap();
    assert_eq!(b.bind_groups_per_step, 0.0, "bind groups created per step after warm-up");
    assert_eq!(b.buffers_created_after_first_step, 0);
}
