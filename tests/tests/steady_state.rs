//! A training step after the first allocates nothing: the pool serves every buffer. Its own test binary, so no
//! other test shares the buffer pool while it runs.

use kiln_models::{run, TrainConfig};

#[test]
fn mlp_steps_allocate_nothing_after_warm_up_and_submit_once() {
    kiln_tests::require_gpu();
    let r = run(&TrainConfig { epochs: Some(3), ..TrainConfig::new("mlp", "digits") }, |_| {}).unwrap();
    assert_eq!(r.buffers_created_after_first_step, 0, "steps after the first of each batch size created GPU buffers");
    assert!(r.submits_per_step <= 2.0, "{} submits per step", r.submits_per_step);
    assert!(r.peak_gpu_bytes > 0);
}
