//! The benchmark suite: every record validated before it is timed, a wrong kernel reported and never timed,
//! the JSON fields scripts read, and step records with no allocation after the first step.

use kiln_benches::suite::{self, Record, Roofs, SuiteOptions, Work};
use kiln_graph::Tensor;
use kiln_tests::require_gpu;

#[test]
fn matmul_and_step_records_are_validated_timed_and_complete() {
    require_gpu();
    let roofs = suite::measure_roofs().unwrap();
    assert!(roofs.fma_gflops > 0.0 && roofs.copy_gbps > 0.0, "{roofs:?}");
    let opts = SuiteOptions { filter: vec!["matmul".into(), "step".into()], square: vec![33, 64], models: vec!["mlp".into()], batch: 8, ..Default::default() };
    let records = suite::run_suite(&opts, roofs, &mut |_| {}).unwrap();
    let matmuls: Vec<&Record> = records.iter().filter(|r| r.family == "matmul").collect();
    // Both squares with every variant that can run them, and the MLP step's forward and backward products.
    assert!(matmuls.iter().any(|r| r.kernel.starts_with("square 33") && r.variant == "naive"));
    assert!(matmuls.iter().any(|r| r.kernel.starts_with("mlp step") && r.kernel.ends_with("nt")), "forward product of the MLP step");
    assert!(matmuls.iter().any(|r| r.kernel.starts_with("mlp step") && r.kernel.ends_with("tn")), "weight gradient of the MLP step");
    for r in &matmuls {
        assert!(r.valid, "{} {} {:?}: {:?}", r.kernel, r.variant, r.shape, r.note);
        let ms = r.median_ms.unwrap_or_else(|| panic!("{} {} not timed: {:?}", r.kernel, r.variant, r.note));
        assert!(ms > 0.0 && r.gflops.unwrap() > 0.0 && r.roof_fraction.unwrap() > 0.0 && r.cpu_gflops.unwrap() > 0.0);
        assert_eq!(r.shape.len(), 4);
    }
    let step = records.iter().find(|r| r.family == "step").expect("a step record");
    assert_eq!(step.model.as_deref(), Some("mlp"));
    assert_eq!(step.bytes_allocated_after_first_step, Some(0), "buffers created after the first step");
    assert_eq!(step.submits_per_step, Some(1.0));
    assert!(step.ms_per_step.unwrap() > 0.0 && step.samples_per_s.unwrap() > 0.0 && step.peak_gpu_bytes.unwrap() > 0);
    // The JSON keys scripts read.
    let json = serde_json::to_value(&records).unwrap();
    for key in ["family", "kernel", "shape", "variant", "valid", "median_ms", "gflops", "roof_fraction", "cpu_gflops", "adapter"] {
        assert!(json[0].get(key).is_some(), "record lacks {key}: {}", json[0]);
    }
    let s = json.as_array().unwrap().iter().find(|r| r["family"] == "step").unwrap();
    for key in ["model", "batch", "ms_per_step", "samples_per_s", "submits_per_step", "bytes_allocated_after_first_step", "peak_gpu_bytes"] {
        assert!(s.get(key).is_some(), "step record lacks {key}: {s}");
    }
}

#[test]
fn a_wrong_kernel_is_reported_and_never_timed() {
    require_gpu();
    let roofs = Roofs { fma_gflops: 1.0, copy_gbps: 1.0 };
    let want = vec![1.0f32, 2.0, 3.0, 4.0];
    let mut calls = 0;
    let rec = Record { family: "test".into(), kernel: "off by one".into(), ..Default::default() };
    let r = suite::validate_and_time(rec, Work { amount: 4.0, bytes: false }, &want, 1e-5, None, roofs, 10, 60.0, || {
        calls += 1;
        Tensor::from_slice(&[1.0, 2.0, 3.0, 5.0], &[4])
    })
    .unwrap();
    assert!(!r.valid && r.median_ms.is_none() && r.gflops.is_none(), "{r:?}");
    assert!(r.note.as_deref().unwrap_or("").contains("wrong"), "{r:?}");
    assert_eq!(calls, 1, "a wrong kernel must not be run again for timing");
    // The same closure with the right answer is timed: at least 10 runs after a warm-up.
    let mut calls = 0;
    let rec = Record { family: "test".into(), kernel: "right".into(), ..Default::default() };
    let r = suite::validate_and_time(rec, Work { amount: 4.0, bytes: false }, &want, 1e-5, None, roofs, 10, 60.0, || {
        calls += 1;
        Tensor::from_slice(&want, &[4])
    })
    .unwrap();
    assert!(r.valid && r.median_ms.is_some(), "{r:?}");
    assert!(calls >= 12, "{calls} calls");
}

#[test]
fn language_model_steps_report_tokens_per_second() {
    require_gpu();
    let roofs = Roofs { fma_gflops: 100.0, copy_gbps: 10.0 };
    let opts = SuiteOptions { filter: vec!["lm".into()], lm_batch: 2, runs: 3, ..Default::default() };
    let records = suite::run_suite(&opts, roofs, &mut |_| {}).unwrap();
    let models: Vec<&str> = records.iter().filter_map(|r| r.model.as_deref()).collect();
    assert_eq!(models, ["char-rnn", "char-transformer"]);
    for r in &records {
        let (ms, tokens) = (r.ms_per_step.unwrap(), r.tokens_per_s.unwrap());
        assert_eq!(r.shape, vec![2, 64]);
        assert!((tokens - 128.0 * 1e3 / ms).abs() < 1e-6 * tokens, "{} tokens/s at {ms} ms for 2 x 64 tokens", tokens);
        assert!(r.gflops.unwrap() > 0.0 && r.peak_gpu_bytes.unwrap() > 0, "{r:?}");
    }
}

#[test]
fn detection_records_are_checked_against_the_reference() {
    require_gpu();
    let roofs = Roofs { fma_gflops: 100.0, copy_gbps: 10.0 };
    let opts = SuiteOptions { filter: vec!["detection".into()], nms: vec![300], roi_align: vec![(20, 8, 16)], scene_sides: vec![64], scene_batch: 2, runs: 3, ..Default::default() };
    let records = suite::run_suite(&opts, roofs, &mut |_| {}).unwrap();
    assert_eq!(records.len(), 12, "{records:?}");
    let nms = &records[0];
    assert!(nms.valid && nms.median_ms.unwrap() > 0.0 && nms.note.as_deref().unwrap().contains("kept"), "{nms:?}");
    let roi = &records[1];
    assert!(roi.valid && roi.median_ms.unwrap() > 0.0 && roi.cpu_gflops.unwrap() > 0.0, "{roi:?}");
    // Transposed convolutions and their adjoint convolutions, 2x2 then 4x4, each checked against the reference.
    for (r, name) in records[2..6].iter().zip(["conv_transpose2d 2x2", "conv2d 2x2", "conv_transpose2d 4x4", "conv2d 4x4"]) {
        assert!(r.kernel.starts_with(name) && r.valid && r.median_ms.unwrap() > 0.0 && r.cpu_gflops.unwrap() > 0.0, "{r:?}");
    }
    let steps = ["two-stage detector step", "YOLO step (anchors", "YOLO step (v1", "fcn segmentation step", "segnet segmentation step", "unet segmentation step"];
    for (step, name) in records[6..].iter().zip(steps) {
        assert!(step.kernel.starts_with(name) && step.kernel.contains("64 x 64") && step.ms_per_step.unwrap() > 0.0 && step.batch == Some(2), "{step:?}");
    }
}

#[test]
fn generative_records_check_the_transposed_convolution_and_time_the_steps() {
    require_gpu();
    let roofs = Roofs { fma_gflops: 100.0, copy_gbps: 10.0 };
    let opts = SuiteOptions { filter: vec!["generative".into()], style_side: 32, runs: 3, ..Default::default() };
    let records = suite::run_suite(&opts, roofs, &mut |_| {}).unwrap();
    let kernels: Vec<&str> = records.iter().map(|r| r.kernel.as_str()).collect();
    assert_eq!(records.len(), 4, "{kernels:?}");
    assert!(records[0].kernel.starts_with("conv_transpose2d") && records[0].valid && records[0].cpu_gflops.unwrap() > 0.0, "{:?}", records[0]);
    for (r, name) in records[1..].iter().zip(["DCGAN step", "VAE step", "style-transfer iteration at 32 x 32"]) {
        assert!(r.kernel.starts_with(name) && r.valid && r.ms_per_step.unwrap() > 0.0, "{r:?}");
    }
}

#[test]
fn allreduce_family_checks_times_and_reports_a_data_parallel_step() {
    require_gpu();
    let roofs = Roofs { fma_gflops: 100.0, copy_gbps: 10.0 };
    let opts =
        SuiteOptions { filter: vec!["allreduce".into()], allreduce_devices: vec![3], allreduce_bytes: vec![4096, 1 << 20], parallel_steps: vec![("lenet".into(), 4)], runs: 3, ..Default::default() };
    let records = suite::run_suite(&opts, roofs, &mut |_| {}).unwrap();
    assert_eq!(records.len(), 4, "{records:?}");
    for (r, bytes) in records[..2].iter().zip([4096, 1 << 20]) {
        assert!(r.kernel == "all-reduce over 3 devices (host-staged)" && r.shape == [bytes] && r.valid, "{r:?}");
        let (ms, busbw) = (r.median_ms.unwrap(), r.gbps.unwrap());
        // Bus bandwidth: bytes / time x 2 (N - 1) / N.
        assert!((busbw - bytes as f64 / ms / 1e6 * 4.0 / 3.0).abs() < 1e-9 * busbw.max(1.0), "{r:?}");
    }
    // The step with the all-reduce after the backward, then with its copies started during it.
    for (step, how) in records[2..].iter().zip(["all-reduce after the backward", "copies started during the backward"]) {
        assert!(step.kernel.starts_with("lenet data-parallel step") && step.valid && step.batch == Some(8) && step.ms_per_step.unwrap() > 0.0, "{step:?}");
        assert!(step.note.as_deref().unwrap().contains("% of the step") && step.variant.contains(how), "{step:?}");
    }
}
