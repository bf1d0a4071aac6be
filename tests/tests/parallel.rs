//! Data parallelism over several devices in one process (`kiln_nn::parallel`, `TrainConfig::devices`,
//! `kiln train --devices`): the all-reduce against an f64 reference, shards, and the exactness test (two
//! logical devices at batch B against one at batch 2B, 20 steps).

use kiln_graph::backend::{Device, DeviceOptions};
use kiln_models::train::{self, TrainConfig};
use kiln_nn::parallel::{all_reduce, open_devices, shard_ranges};
use kiln_nn::OptimizerKind;
use kiln_tests::{require_gpu, test_rng};

/// A new logical device on the default device's adapter.
fn device() -> Device {
    let adapter = require_gpu().info.name.clone();
    let d = Device::open(&DeviceOptions { adapter: Some(adapter), ..Default::default() }).expect("a logical device on the default adapter");
    kiln_graph::tune::set_mode(&d, Some(kiln_graph::tune::Mode::Off));
    d
}

#[test]
fn all_reduce_gives_every_device_the_weighted_sum() {
    require_gpu();
    let mut rng = test_rng("all_reduce");
    let devices = [device(), device(), device()];
    // Odd lengths, buckets of 1 KiB (several per buffer) and one bigger than the buffer.
    for (len, bucket) in [(1 + rng.below(3000) as usize, 1024u64), (257, 1 << 20), (1, 256)] {
        let values: Vec<Vec<f32>> = devices.iter().map(|_| (0..len).map(|_| rng.normal() as f32).collect()).collect();
        // The third replica has weight 0: it holds NaN, which must never reach the sum.
        let weights = [0.25 + rng.uniform() * 0.5, 0.4, 0.0];
        let mut host = values.clone();
        host[2] = vec![f32::NAN; len];
        let buffers: Vec<_> = devices.iter().zip(&host).map(|(d, v)| d.upload(bytemuck::cast_slice(v), "test gradients").unwrap()).collect();
        let timing = all_reduce(&buffers, len, &weights, bucket).unwrap();
        assert_eq!((timing.bytes, timing.replicas), (4 * len as u64, 3));
        let want: Vec<f64> = (0..len).map(|i| weights[0] * values[0][i] as f64 + weights[1] * values[1][i] as f64).collect();
        let first: Vec<f32> = bytemuck::pod_collect_to_vec(&devices[0].read(&buffers[0].sub(0, 4 * len as u64)).unwrap());
        for (k, (d, b)) in devices.iter().zip(&buffers).enumerate() {
            let got: Vec<f32> = bytemuck::pod_collect_to_vec(&d.read(&b.sub(0, 4 * len as u64)).unwrap());
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "device {k} got other bits than device 0");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "len {len}, element {i}: {g} against {w}");
            }
        }
    }
    // Bad input: clear errors.
    let b = devices[0].upload(bytemuck::cast_slice(&[1f32; 4]), "test").unwrap();
    for (bufs, len, weights, what) in [
        (vec![b.clone()], 4, vec![1.0, 1.0], "weights"),
        (vec![b.clone()], 5, vec![1.0], "cannot hold 5 floats"),
        (vec![b.clone()], 4, vec![-1.0], "not a finite number"),
        (vec![], 4, vec![], "at least one"),
    ] {
        let e = all_reduce(&bufs, len, &weights, 1024).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
}

#[test]
fn shards_cover_the_batch_in_order() {
    for (n, k) in [(32, 2), (33, 2), (7, 3), (1, 2), (0, 3), (5, 1)] {
        let s = shard_ranges(n, k);
        assert_eq!(s.len(), k);
        assert_eq!(s.iter().map(|r| r.len()).sum::<usize>(), n);
        assert!(s.windows(2).all(|w| w[0].end == w[1].start && w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1), "{n} over {k}: {s:?}");
    }
}

/// The weights of a finished run (its last.safetensors), by name.
fn weights(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let ck = kiln_nn::checkpoint::load(&dir.join("last.safetensors")).unwrap();
    ck.tensors.into_iter().map(|t| (t.name, t.data)).collect()
}

/// Per tensor, max |a - b| over max |b|: the largest over all tensors.
fn max_relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    assert_eq!(a.iter().map(|t| &t.0).collect::<Vec<_>>(), b.iter().map(|t| &t.0).collect::<Vec<_>>());
    a.iter()
        .zip(b)
        .map(|((_, x), (_, y))| {
            let scale = y.iter().fold(1e-12f64, |m, v| m.max(v.abs() as f64));
            x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((*p as f64 - *q as f64).abs())) / scale
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_devices_at_batch_b_train_as_one_device_at_batch_2b() {
    require_gpu();
    let root = std::env::temp_dir().join(format!("kiln-parallel-{}", std::process::id()));
    // 640 digits at a whole batch of 32: 20 steps. SGD with momentum, and Adam.
    for (name, optimizer, lr) in [("sgd", OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.05f32), ("adam", OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 1e-3)] {
        let cfg = |devices: Vec<Device>, dir: &str| TrainConfig {
            epochs: Some(1),
            batch_size: Some(32),
            train_limit: Some(640),
            optimizer: Some(optimizer),
            lr: Some(lr),
            out_dir: Some(root.join(format!("{name}-{dir}"))),
            devices,
            ..TrainConfig::new("mlp", "digits")
        };
        let one = train::run(&cfg(vec![device()], "one"), |_| {}).unwrap();
        let two = train::run(&cfg(vec![device(), device()], "two"), |_| {}).unwrap();
        assert_eq!((one.steps, two.steps), (20, 20));
        assert!(one.data_parallel.is_none());
        let p = two.data_parallel.as_ref().expect("a data-parallel report");
        assert_eq!(p.devices.len(), 2);
        assert!(p.gradient_bytes as usize >= 4 * two.parameters, "{p:?}");
        assert!(p.all_reduce_ms_per_step > 0.0 && p.communication_share > 0.0 && p.communication_share < 1.0, "{p:?}");
        let diff = max_relative_difference(&weights(&root.join(format!("{name}-two"))), &weights(&root.join(format!("{name}-one"))));
        eprintln!("{name}: max relative difference of the weights after 20 steps: {diff:.3e}");
        assert!(diff < 1e-5, "{name}: two devices at batch 16 and one at batch 32 differ by {diff:.3e} (relative) after 20 steps");
        // The losses match too (the step's loss is the mean over the whole batch).
        assert!((one.history[0].train_loss - two.history[0].train_loss).abs() < 1e-4 * one.history[0].train_loss.abs().max(1.0), "{} against {}", one.history[0].train_loss, two.history[0].train_loss);
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn replicas_with_batch_norm_and_an_empty_shard_stay_equal() {
    require_gpu();
    // A ResNet-8 (batch norm: buffers each replica updates from its own rows) on 65 digits at batch 32: the
    // last batch has one sample, so one of the two replicas sees nothing in that step and still updates
    // alike. Replicas that drifted would fail the run at the epoch-end checksum.
    let dir = std::env::temp_dir().join(format!("kiln-parallel-bn-{}", std::process::id()));
    let cfg = TrainConfig {
        epochs: Some(2),
        batch_size: Some(32),
        train_limit: Some(65),
        depth: Some(8),
        out_dir: Some(dir.clone()),
        devices: vec![device(), device()],
        ..TrainConfig::new("resnet", "digits")
    };
    let r = train::run(&cfg, |_| {}).unwrap();
    assert_eq!(r.steps, 6);
    let p = r.data_parallel.expect("a data-parallel report");
    assert_eq!(p.checksum.len(), 16);
    assert!(r.test_loss.is_finite());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_device_lists_and_too_few_samples_are_clear_errors() {
    require_gpu();
    let e = open_devices("7").unwrap_err().to_string();
    assert!(e.contains("no adapter \"7\"") && e.contains("adapters:"), "{e}");
    let e = open_devices("no-such-gpu").unwrap_err().to_string();
    assert!(e.contains("no adapter \"no-such-gpu\""), "{e}");
    let e = open_devices("0,,0").unwrap_err().to_string();
    assert!(e.contains("separated by commas"), "{e}");
    assert_eq!(open_devices("0,0").unwrap().len(), 2);
    // `all`: the adapters of one kind, each physical one once.
    let all = kiln_nn::parallel::distinct_adapters();
    assert!(!all.is_empty());
    let devices = open_devices("all").unwrap();
    assert_eq!(devices.len(), all.len());
    assert!(devices.iter().all(|d| d.adapter_name() == devices[0].adapter_name()));
    let cfg = TrainConfig { epochs: Some(1), train_limit: Some(2), devices: vec![device(), device(), device()], ..TrainConfig::new("mlp", "digits") };
    let e = train::run(&cfg, |_| {}).unwrap_err().to_string();
    assert!(e.contains("cannot be shared between 3 devices") && e.contains("--batch-size of at least 3"), "{e}");
}
