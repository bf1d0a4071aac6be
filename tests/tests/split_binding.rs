//! Operands larger than one storage binding: the matmul splits them into bindable pieces. This binary lowers
//! the limit to 4 KiB (KILN_MAX_BINDING_BYTES) before the GPU starts, so small tensors take the paths that
//! VGG-16's 411 MB classifier weight takes on an adapter with a 128 MiB binding limit.

use kiln_graph::Tensor;
use kiln_tests::{check_op, require_gpu, Domain};

fn lower_the_limit() {
    std::env::set_var("KILN_MAX_BINDING_BYTES", "4096");
    let g = require_gpu();
    assert_eq!(g.max_binding_bytes(), 4096, "the GPU started before the limit was lowered");
}

#[test]
fn big_operands_split_forward_and_backward() {
    lower_the_limit();
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
}

#[test]
fn big_output_splits_by_rows() {
    // A big C cannot take part in elementwise ops under this limit, so only its values are checked.
    lower_the_limit();
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
}

#[test]
fn two_big_operands_are_a_clear_error() {
    lower_the_limit();
    let a = Tensor::zeros(&[1, 1]).unwrap();
    let _ = a; // the GPU is up; make two operands over the limit without binding them
    let big_a = Tensor::from_slice(&vec![0.5; 40 * 100], &[40, 100]).unwrap();
    let big_b = Tensor::from_slice(&vec![0.5; 100 * 40], &[100, 40]).unwrap();
    let e = big_a.matmul(&big_b).unwrap_err().to_string();
    assert!(e.contains("max_storage_buffer_binding_size") && e.contains("4096"), "{e}");
}
