//! Errors that show instead of silent zeros: labels and indices out of range make NaN (the loss says so), and
//! anomaly detection names the first op whose output held a NaN or an infinity, in a step of the training loop
//! too. A soak test: many steps with flat GPU memory and caches.

use kiln_data::{ArrayDataset, DataLoader, LoaderOptions, StackRows, Targets};
use kiln_graph::{anomaly, loss, Tensor};
use kiln_models::{EpochRecord, StepValues, Trainer};
use kiln_nn::schedule::Schedule;
use kiln_nn::{Init, Layer, Linear, Optimizer, OptimizerKind, VarStore};
use kiln_tests::{require_gpu, with_settings_device};

#[test]
fn out_of_range_labels_and_indices_are_nan_not_zero() {
    require_gpu();
    let logits = Tensor::from_slice(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], &[2, 3]).unwrap();
    let labels = Tensor::from_u32(&[1, 3], &[2]).unwrap();
    assert!(loss::cross_entropy(&logits, &labels).unwrap().to_scalar().unwrap().is_nan(), "fused cross-entropy");
    let one_hot = Tensor::one_hot(&labels, 3).unwrap().to_vec().unwrap();
    assert_eq!(&one_hot[..3], &[0.0, 1.0, 0.0]);
    assert!(one_hot[3..].iter().all(|v| v.is_nan()), "{one_hot:?}");
    let picked = logits.index_select(0, &Tensor::from_u32(&[1, 2], &[2]).unwrap()).unwrap().to_vec().unwrap();
    assert_eq!(&picked[..3], &[0.4, 0.5, 0.6]);
    assert!(picked[3..].iter().all(|v| v.is_nan()), "{picked:?}");
}

#[test]
fn anomaly_detection_names_the_first_op_that_made_a_nan() {
    require_gpu();
    let dev = kiln_graph::backend::Device::current().unwrap();
    // log(-1) is NaN; the exp after it is NaN too, but the log came first.
    anomaly::begin(&dev).unwrap();
    let x = Tensor::from_slice(&[1.0, -1.0, 2.0], &[3]).unwrap().var();
    let y = x.scale(2.0).unwrap().log().unwrap().exp().unwrap();
    let first = anomaly::end().unwrap();
    assert_eq!(first.as_deref(), Some("log -> [3]"));
    let _ = y;
    // A label out of range, through the fused cross-entropy.
    anomaly::begin(&dev).unwrap();
    let logits = Tensor::from_slice(&[0.1, 0.2, 0.3, 0.4], &[2, 2]).unwrap().var();
    let l = loss::cross_entropy(&logits, &Tensor::from_u32(&[0, 9], &[2]).unwrap()).unwrap();
    assert_eq!(anomaly::end().unwrap().as_deref(), Some("cross_entropy -> []"));
    // In a backward pass: the gradient of sqrt at 0 is infinite, and the op is named by its rule.
    anomaly::begin(&dev).unwrap();
    let z = Tensor::from_slice(&[0.0, 4.0], &[2]).unwrap().var();
    let _ = z.sqrt().unwrap().sum_all().unwrap().backward().unwrap();
    let first = anomaly::end().unwrap().unwrap();
    assert_eq!(first, "div in the backward of sqrt -> [2]");
    // Nothing to report: None, and the values are untouched.
    anomaly::begin(&dev).unwrap();
    let ok = logits.softmax(1).unwrap();
    assert_eq!(anomaly::end().unwrap(), None);
    assert!(ok.to_vec().unwrap().iter().all(|v| v.is_finite()));
    let _ = l;
}

fn line(n: usize) -> ArrayDataset {
    let x: Vec<f32> = (0..2 * n).map(|i| ((i * 37) % 64) as f32 / 32.0 - 1.0).collect();
    let y = (0..n).map(|i| 2.0 * x[2 * i] - x[2 * i + 1]).collect();
    ArrayDataset { name: "line".into(), x, features: 2, targets: Targets::Values(y), image: None }
}

#[test]
fn the_training_loop_stops_at_the_first_nan_naming_its_op() {
    with_settings_device(|dev| {
        anomaly::set_enabled(dev, true);
        let mut vs = VarStore::on(dev, 1);
        let net = Linear::new(&mut vs, "fc", 2, 1, Init::XavierUniform).unwrap();
        vs.finish().unwrap();
        let mut opt = Optimizer::new(&vs, OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.1, 0.0, Schedule::constant(), 100).unwrap();
        let loader = DataLoader::new(line(64), StackRows::default(), LoaderOptions { batch_size: 16, ..Default::default() }).unwrap();
        let mut trainer = Trainer::new(1, 4);
        // Step 3 takes the square root of a negative number.
        let step = |batch: &kiln_data::HostBatch, i: u64| {
            let t = batch.upload()?;
            let mut out = net.forward(&t[0])?;
            if i == 2 {
                out = out.add_scalar(-100.0)?.sqrt()?;
            }
            let l = loss::mse_loss(&out, &t[1])?;
            opt.step(&vs, &l.backward()?)?;
            Ok(StepValues { loss: l, correct: None })
        };
        let evaluate = |_| -> kiln_graph::Result<EpochRecord> { unreachable!("the epoch stops at step 3") };
        let err = trainer.fit(&loader, step, evaluate).expect_err("an error").to_string();
        assert!(err.contains("step 3") && err.contains("sqrt"), "{err}");
    });
}

#[test]
fn a_long_run_keeps_gpu_memory_and_caches_flat() {
    // 10,000 steps with KILN_SOAK_STEPS=10000 (CI runs 600): after the first epoch, no buffer, pipeline or bind
    // group is created and peak memory does not grow.
    // On a device of its own, so the other tests of this binary, running at the same time, do not count.
    let adapter = require_gpu().info.name.clone();
    let dev = kiln_graph::backend::Device::open(&kiln_graph::backend::DeviceOptions { adapter: Some(adapter), ..Default::default() }).unwrap();
    kiln_graph::tune::set_mode(&dev, Some(kiln_graph::tune::Mode::Off));
    dev.scope(|| soak(&dev));
}

fn soak(dev: &kiln_graph::backend::Device) {
    let steps: usize = std::env::var("KILN_SOAK_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let mut vs = VarStore::new(3);
    let (fc1, fc2) = (Linear::new(&mut vs, "fc1", 2, 32, Init::HeNormal).unwrap(), Linear::new(&mut vs, "fc2", 32, 1, Init::XavierUniform).unwrap());
    vs.finish().unwrap();
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 1e-3, 0.0, Schedule::constant(), steps as u64).unwrap();
    let loader = DataLoader::new(line(256), StackRows::default(), LoaderOptions { batch_size: 16, shuffle: Some(1), ..Default::default() }).unwrap();
    let mut step = 0;
    let mut after_warm_up = None;
    while step < steps {
        for batch in loader.epoch(step as u64) {
            let t = batch.unwrap().upload().unwrap();
            let l = loss::mse_loss(&fc2.forward(&fc1.forward(&t[0]).unwrap().tanh().unwrap()).unwrap(), &t[1]).unwrap();
            opt.step(&vs, &l.backward().unwrap()).unwrap();
            let _ = l.to_scalar().unwrap();
            step += 1;
            if step == 16 {
                after_warm_up = Some(dev.stats());
            }
        }
    }
    let (a, b) = (after_warm_up.unwrap(), dev.stats());
    assert_eq!(b.buffers_created, a.buffers_created, "buffers created after warm-up over {steps} steps");
    assert_eq!(b.pipelines_created, a.pipelines_created, "pipelines created after warm-up");
    assert_eq!(b.bind_groups_created, a.bind_groups_created, "bind groups created after warm-up");
    assert_eq!(b.peak_live_bytes, a.peak_live_bytes, "peak GPU memory grew");
}
