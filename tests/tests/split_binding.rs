//! Operands larger than one storage binding: the matmul splits them into bindable pieces. The tests run on a
//! device opened with a 4 KiB binding limit (`DeviceOptions::max_binding_bytes`, or KILN_MAX_BINDING_BYTES),
//! so small tensors take the paths that VGG-16's 411 MB classifier weight takes on an adapter with a 128 MiB
//! binding limit.

use kiln_graph::Tensor;
use kiln_tests::{check_op, require_gpu, Domain};

/// A device of this binary with a 4 KiB binding limit, on the default device's adapter.
fn small_binding_device() -> &'static kiln_graph::backend::Device {
    static DEVICE: std::sync::OnceLock<kiln_graph::backend::Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(|| {
        let adapter = require_gpu().info.name.clone();
        let options = kiln_graph::backend::DeviceOptions { adapter: Some(adapter), max_binding_bytes: Some(4096), ..Default::default() };
        let d = kiln_graph::backend::Device::open(&options).expect("a device with a lowered binding limit");
        assert_eq!(d.max_binding_bytes(), 4096);
        kiln_graph::tune::set_mode(&d, Some(kiln_graph::tune::Mode::Off));
        d
    })
}

#[test]
fn big_operands_split_forward_and_backward() {
    small_binding_device().scope(|| {
        // (m, k, n, trans_a, trans_b): which operand is over 1024 floats decides the split.
        let cases = [
            (3, 40, 100, false, true),  // big B stored [n, k] (a Linear weight): split by n
            (3, 100, 40, false, false), // big B stored [k, n]: split by k
            (40, 100, 3, true, false),  // big A stored [k, m]: split by k
            (100, 40, 3, false, false), // big A stored [m, k]: split by m
        ];
        for (m, k, n, ta, tb) in cases {
            let a: Vec<usize> = if ta { vec![k, m] } else { vec![m, k] };
            let b: Vec<usize> = if tb { vec![n, k] } else { vec![k, n] };
            check_op(&format!("split matmul {m}x{k}x{n} ta={ta} tb={tb}"), &[(&a, Domain::Any), (&b, Domain::Any)], |x| x[0].matmul_t(&x[1], ta, tb), |x| x[0].matmul_t(&x[1], ta, tb));
        }
    })
}

#[test]
fn big_output_splits_by_rows() {
    // A big C cannot take part in elementwise ops under this limit, so only its values are checked.
    small_binding_device().scope(|| {
        let mut rng = kiln_tests::test_rng("split_c");
        for (ta, tb) in [(false, false), (true, true)] {
            let (m, k, n) = (60, 5, 50);
            let av: Vec<f32> = (0..m * k).map(|_| rng.range(-1.0, 1.0) as f32).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
            let (ash, bsh) = (if ta { [k, m] } else { [m, k] }, if tb { [n, k] } else { [k, n] });
            let got = Tensor::from_slice(&av, &ash).unwrap().matmul_t(&Tensor::from_slice(&bv, &bsh).unwrap(), ta, tb).unwrap().to_vec().unwrap();
            let want = kiln_graph::cpu::CpuTensor::from_f32(&av, &ash).matmul_t(&kiln_graph::cpu::CpuTensor::from_f32(&bv, &bsh), ta, tb);
            kiln_tests::assert_close("split C", &got, &want.data, 1e-4);
        }
    })
}

#[test]
fn two_big_operands_are_a_clear_error() {
    small_binding_device().scope(|| {
        let a = Tensor::zeros(&[1, 1]).unwrap();
        let _ = a; // the GPU is up; make two operands over the limit without binding them
        let big_a = Tensor::from_slice(&vec![0.5; 40 * 100], &[40, 100]).unwrap();
        let big_b = Tensor::from_slice(&vec![0.5; 100 * 40], &[100, 40]).unwrap();
        let e = big_a.matmul(&big_b).unwrap_err().to_string();
        assert!(e.contains("max_storage_buffer_binding_size") && e.contains("4096"), "{e}");
    })
}
