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

/// Per tensor, max |a - b| over max |b| (at least 0.01: a linear layer's bias before batch norm has a zero
/// gradient in exact arithmetic and holds float noise of 1e-8, which no two summation orders share): the
/// largest over all tensors.
fn max_relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    assert_eq!(a.iter().map(|t| &t.0).collect::<Vec<_>>(), b.iter().map(|t| &t.0).collect::<Vec<_>>());
    a.iter()
        .zip(b)
        .map(|((_, x), (_, y))| {
            let scale = y.iter().fold(1e-2f64, |m, v| m.max(v.abs() as f64));
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

/// An MLP with batch norm and dropout between its layers (no model of the registry has both).
fn mlp_with_batch_norm_and_dropout(vs: &mut kiln_nn::VarStore, data: &kiln_data::ArrayDataset, _: &kiln_models::linear_models::Arch) -> kiln_graph::Result<kiln_models::linear_models::Model> {
    use kiln_nn::{Activation, BatchNorm, Dropout, Init, Linear, Sequential};
    let classes = data.num_classes().expect("digits has classes");
    let net = Sequential::new()
        .push(Linear::new(vs, "fc1", data.features, 48, Init::HeNormal)?)
        .push(BatchNorm::new(vs, "bn1", 48)?)
        .push(Activation::Relu)
        .push(Dropout::new(0.3, 7)?)
        .push(Linear::new(vs, "fc2", 48, classes, Init::XavierUniform)?);
    Ok(kiln_models::linear_models::Model { net, task: kiln_models::linear_models::Task::Softmax, outputs: classes })
}

#[test]
fn synchronised_batch_norm_and_per_shard_dropout_train_as_one_device() {
    require_gpu();
    let root = std::env::temp_dir().join(format!("kiln-parallel-sync-{}", std::process::id()));
    let base = kiln_models::registry::entry("mlp").unwrap();
    let entry = kiln_models::registry::ModelEntry { name: "mlp-bn-dropout", build: mlp_with_batch_norm_and_dropout, ..*base };
    let cfg = |devices: Vec<Device>, sync: bool, dir: &str| TrainConfig {
        epochs: Some(1),
        batch_size: Some(32),
        train_limit: Some(640),
        optimizer: Some(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }),
        lr: Some(0.05),
        out_dir: Some(root.join(dir)),
        devices,
        sync_batch_norm: sync,
        ..TrainConfig::new("mlp", "digits")
    };
    let one = train::run_with(&entry, &cfg(vec![device()], false, "one"), |_| {}).unwrap();
    // Two and three devices (shards of 16 and 11/11/10 rows): batch norm with the whole batch's statistics,
    // and each shard's dropout masks those one device draws for its rows.
    for (n, dir) in [(2, "sync2"), (3, "sync3")] {
        let r = train::run_with(&entry, &cfg((0..n).map(|_| device()).collect(), true, dir), |_| {}).unwrap();
        assert_eq!(r.steps, 20);
        let diff = max_relative_difference(&weights(&root.join(dir)), &weights(&root.join("one")));
        eprintln!("{n} devices, synchronised batch norm: max relative difference of the weights and statistics after 20 steps: {diff:.3e}");
        assert!(diff < 1e-5, "{n} devices with synchronised batch norm differ from one device by {diff:.3e} (relative) after 20 steps");
        assert!((one.history[0].train_loss - r.history[0].train_loss).abs() < 1e-4, "{} against {}", one.history[0].train_loss, r.history[0].train_loss);
    }
    // Per-device statistics (the default) are another computation: the same comparison must fail there.
    train::run_with(&entry, &cfg(vec![device(), device()], false, "local"), |_| {}).unwrap();
    let diff = max_relative_difference(&weights(&root.join("local")), &weights(&root.join("one")));
    eprintln!("2 devices, per-device batch norm: {diff:.3e}");
    assert!(diff > 1e-3, "per-device batch statistics should differ from the whole batch's ({diff:.3e})");
    // An epoch whose last batch cannot reach every replica is refused before training.
    let short = TrainConfig { train_limit: Some(641), ..cfg(vec![device(), device()], true, "short") };
    let e = train::run_with(&entry, &short, |_| {}).unwrap_err().to_string();
    assert!(e.contains("synchronised batch norm") && e.contains("batch of 1 rows") && e.contains("2 replicas"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_all_reduce_starts_during_the_backward_and_sums_as_after_it() {
    use kiln_graph::Tensor;
    use kiln_nn::parallel::{all_reduce_gradients, OverlappedAllReduce};
    use kiln_nn::schedule::Schedule;
    use kiln_nn::{Activation, Init, Layer, Linear, Optimizer, Sequential, VarStore};
    require_gpu();
    let mut rng = test_rng("overlapped all-reduce");
    let devices = [device(), device()];
    // A four-layer MLP per device (the same seed: replicas), 256-byte buckets: many of them.
    let replica = |d: &Device| {
        d.scope(|| {
            let mut vs = VarStore::new(3);
            let mut net = Sequential::new();
            for (i, (a, b)) in [(13, 40), (40, 33), (33, 21), (21, 5)].into_iter().enumerate() {
                net = net.push(Linear::new(&mut vs, &format!("fc{i}"), a, b, Init::HeNormal).unwrap());
                if i < 3 {
                    net = net.push(Activation::Tanh);
                }
            }
            vs.finish().unwrap();
            let opt = Optimizer::new(&vs, OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.1, 0.0, Schedule::constant(), 10).unwrap();
            (vs, net, opt)
        })
    };
    let inputs: Vec<Vec<f32>> = (0..2).map(|i| (0..(7 + 4 * i) * 13).map(|_| rng.normal() as f32).collect()).collect();
    let loss = |d: &Device, net: &Sequential, x: &[f32]| d.scope(|| net.forward(&Tensor::from_slice(x, &[x.len() / 13, 13]).unwrap()).unwrap().tanh().unwrap().mean(&[0, 1], false).unwrap());
    let shares = [7usize, 11];
    // After the backward: the plain all-reduce.
    let mut reference: Vec<_> = devices.iter().map(replica).collect();
    for ((d, (_, net, opt)), x) in devices.iter().zip(reference.iter_mut()).zip(&inputs) {
        let grads = loss(d, net, x).backward().unwrap();
        d.scope(|| opt.accumulate(&grads)).unwrap();
    }
    let mut opts: Vec<&mut Optimizer> = reference.iter_mut().map(|r| &mut r.2).collect();
    all_reduce_gradients(&mut opts, &shares, 256).unwrap();
    // During the backward: the copies of the last layers' buckets start before the first layer's gradient exists;
    // reducing eagerly, the last layers' buckets are also summed before it.
    for eager in [false, true] {
        let mut overlapped: Vec<_> = devices.iter().map(replica).collect();
        let mut stream = OverlappedAllReduce::new(&overlapped.iter().map(|r| &r.2).collect::<Vec<_>>(), 256).unwrap();
        if eager {
            stream.reduce_eagerly(&overlapped.iter().map(|r| &r.2).collect::<Vec<_>>(), vec![7.0 / 18.0, 11.0 / 18.0]);
        }
        for (i, ((d, (vs, net, opt)), x)) in devices.iter().zip(overlapped.iter_mut()).zip(&inputs).enumerate() {
            let first_layer = vs.params().find(|p| p.name() == "fc0.weight").unwrap().tensor().unwrap().id();
            let mut before_first_layer = None;
            d.scope(|| -> kiln_graph::Result<()> {
                opt.begin_accumulate()?;
                loss(d, net, x).backward_with(&mut |leaf, g| {
                    if leaf.id() == first_layer {
                        before_first_layer = Some((stream.copies_started(), stream.buckets_reduced()));
                    }
                    if let Some(slot) = opt.accumulate_param(leaf, g)? {
                        stream.gradient_ready(i, opt, slot, None)?;
                    }
                    Ok(())
                })?;
                stream.backward_done(i, opt)
            })
            .unwrap();
            let (copies, reduced) = before_first_layer.expect("the first layer's gradient was handed over");
            assert!(copies > 0, "replica {i}: no bucket copy had started when the first layer's gradient arrived");
            // Replicas run in turn: buckets can be summed only once the last replica completes them.
            let summed_early = eager && i == 1;
            assert_eq!(reduced > 0, summed_early, "replica {i}, eager {eager}: {reduced} buckets summed before the first layer's gradient");
        }
        let mut opts: Vec<&mut Optimizer> = overlapped.iter_mut().map(|r| &mut r.2).collect();
        let timing = stream.finish(&mut opts, &shares, 18, None).unwrap();
        assert!(timing.overlapped_buckets > 0 && timing.overlapped_buckets <= timing.bucket_copies && timing.bucket_copies >= 2 * 10, "{timing:?}");
        for ((d, r), o) in devices.iter().zip(&reference).zip(&overlapped) {
            let (a, n) = r.2.gradient_buffer();
            let (b, _) = o.2.gradient_buffer();
            let (a, b) = (d.read(&a.sub(0, 4 * n as u64)).unwrap(), d.read(&b.sub(0, 4 * n as u64)).unwrap());
            assert_eq!(a, b, "the overlapped all-reduce (eager {eager}) must give the same bits as the one after the backward");
        }
    }
}
