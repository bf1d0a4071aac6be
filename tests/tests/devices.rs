//! Devices as values: two logical devices on one adapter in one process, each with its own pool, caches and
//! settings; ops across devices are errors naming both; tensors move with `Tensor::to`; the same training run on
//! two devices from two threads at once matches a single-device run bit for bit.

use kiln_graph::backend::{Device, DeviceOptions};
use kiln_graph::Tensor;
use kiln_models::train::{self, TrainConfig};
use kiln_tests::require_gpu;

/// A new logical device on the default device's adapter (its own wgpu device and queue).
fn second_device() -> Device {
    let adapter = require_gpu().info.name.clone();
    let d = Device::open(&DeviceOptions { adapter: Some(adapter), ..Default::default() }).expect("a second device on the same adapter");
    kiln_graph::tune::set_mode(&d, Some(kiln_graph::tune::Mode::Off));
    d
}

#[test]
fn ops_across_devices_are_errors_naming_both() {
    let a_dev = Device::default_device().unwrap();
    let b_dev = second_device();
    assert_ne!(a_dev, b_dev);
    let a = Tensor::from_slice_on(&a_dev, &[1.0, 2.0, 3.0], &[3]).unwrap();
    let b = Tensor::from_slice_on(&b_dev, &[4.0, 5.0, 6.0], &[3]).unwrap();
    assert_eq!(a.device(), &a_dev);
    assert_eq!(b.device(), &b_dev);
    for e in [a.add(&b).unwrap_err().to_string(), a.reshape(&[1, 3]).unwrap().matmul(&b.reshape(&[3, 1]).unwrap()).unwrap_err().to_string(), Tensor::concat(&[&a, &b], 0).unwrap_err().to_string()] {
        assert!(e.contains(&a_dev.describe()) && e.contains(&b_dev.describe()), "{e}");
        assert!(e.contains("two devices"), "{e}");
    }
    // Moved, they combine; values survive the trip both ways.
    let moved = b.to(&a_dev).unwrap();
    assert_eq!(moved.device(), &a_dev);
    assert_eq!(a.add(&moved).unwrap().to_vec().unwrap(), vec![5.0, 7.0, 9.0]);
    assert_eq!(moved.to(&b_dev).unwrap().to_vec().unwrap(), vec![4.0, 5.0, 6.0]);
    // Made inside a scope, tensors go to the scope's device; outside, to the default one.
    let scoped = b_dev.scope(|| Tensor::zeros(&[2]).unwrap());
    assert_eq!(scoped.device(), &b_dev);
    assert_eq!(Tensor::zeros(&[2]).unwrap().device(), &a_dev);
}

#[test]
fn each_device_has_its_own_pool_and_settings() {
    let a_dev = Device::default_device().unwrap();
    let b_dev = second_device();
    // A setting changed on one device leaves the other's alone.
    kiln_graph::set_fusion(&b_dev, false);
    assert!(!kiln_graph::fusion_enabled(&b_dev));
    assert!(kiln_graph::fusion_enabled(&a_dev) || std::env::var("KILN_FUSE").is_ok());
    // Buffers come from, and go back to, their own device's pool.
    let before = b_dev.stats().buffers_created;
    let x = Tensor::from_slice_on(&b_dev, &vec![1.0; 1000], &[1000]).unwrap();
    let y = x.exp().unwrap().sum_all().unwrap();
    assert!((y.to_scalar().unwrap() - 1000.0 * 1f32.exp()).abs() < 0.1);
    assert!(b_dev.stats().buffers_created > before, "the second device allocated nothing of its own");
    drop((x, y));
    b_dev.sync().unwrap();
    let created = b_dev.stats().buffers_created;
    let x = Tensor::from_slice_on(&b_dev, &vec![1.0; 1000], &[1000]).unwrap();
    let _ = x.exp().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert_eq!(b_dev.stats().buffers_created, created, "the second device's pool did not serve the repeat");
}

fn mlp_config() -> TrainConfig {
    TrainConfig { epochs: Some(2), train_limit: Some(600), ..TrainConfig::new("mlp", "digits") }
}

/// Everything a run reports that depends on its numbers (timings left out).
fn numbers(r: &train::TrainReport) -> Vec<u64> {
    let mut v: Vec<f64> = r.history.iter().flat_map(|e| [e.train_loss, e.train_accuracy, e.dev_loss, e.dev_metric]).collect();
    v.push(r.test_loss);
    v.extend(r.test.test_accuracy);
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn the_same_run_on_two_devices_from_two_threads_matches_one_device_bit_for_bit() {
    require_gpu();
    let reference = numbers(&train::run(&mlp_config(), |_| {}).expect("single-device run"));
    let devices = [second_device(), second_device()];
    let runs: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices.iter().map(|d| s.spawn(move || d.scope(|| train::run(&mlp_config(), |_| {})).expect("run on its own device"))).collect();
        handles.into_iter().map(|h| numbers(&h.join().expect("training thread"))).collect()
    });
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r, &reference, "device {i}: losses and accuracies differ from the single-device run");
    }
    // Each device did its own work: both allocated and dispatched.
    for d in &devices {
        assert!(d.stats().dispatches > 100, "{} ran {} dispatches", d.describe(), d.stats().dispatches);
    }
}
