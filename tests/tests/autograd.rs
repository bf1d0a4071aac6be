//! The tape: a tensor used twice, a chain of ten ops, no_grad and detach.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::kernels::{BinaryKind, UnaryKind};
use kiln_graph::{no_grad, Tensor};
use kiln_tests::{assert_close, check_op, require_gpu, test_rng, Domain};

#[test]
fn tensor_used_twice_gets_both_contributions() {
    require_gpu();
    let mut rng = test_rng("used_twice");
    let xs: Vec<f32> = (0..33).map(|_| rng.range(-2.0, 2.0) as f32).collect();
    let x = Tensor::from_slice(&xs, &[33]).unwrap().var();
    // y = sum(x * x + x)  =>  dy/dx = 2x + 1
    let y = x.mul(&x).unwrap().add(&x).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    let want: Vec<f64> = xs.iter().map(|&v| 2.0 * v as f64 + 1.0).collect();
    assert_close("d/dx sum(x*x + x)", &g.get(&x).unwrap().to_vec().unwrap(), &want, 1e-5);
}

#[test]
fn shared_weight_in_two_branches() {
    check_op(
        "x@w + tanh(x@w)@w^T...",
        &[(&[5, 7], Domain::Any), (&[7, 7], Domain::Any)],
        |t| {
            let h = t[0].matmul(&t[1])?;
            h.tanh()?.matmul(&t[1])?.add(&h)
        },
        |t| {
            let h = t[0].matmul_t(&t[1], false, false);
            h.unary(UnaryKind::Tanh, 0.0, 0.0).matmul_t(&t[1], false, false).binary(BinaryKind::Add, &h)
        },
    );
}

#[test]
fn chain_of_ten_ops() {
    check_op(
        "chain of 10 ops",
        &[(&[7, 33], Domain::Any), (&[33], Domain::Positive)],
        |t| {
            let h = t[0].broadcast_mul(&t[1])?; // 1
            let h = h.tanh()?; // 2
            let h = h.affine(1.5, 0.25)?; // 3
            let h = h.exp()?; // 4
            let h = h.log_softmax(1)?; // 5
            let h = h.sigmoid()?; // 6
            let h = h.t()?; // 7
            let h = h.powf(2.0)?; // 8
            let h = h.sum(&[1], true)?; // 9
            h.softplus() // 10
        },
        |t| {
            let h = t[0].binary(BinaryKind::Mul, &t[1]);
            let h = h.unary(UnaryKind::Tanh, 0.0, 0.0).unary(UnaryKind::Affine, 1.5, 0.25).unary(UnaryKind::Exp, 0.0, 0.0);
            let h = h.softmax(1, true).unary(UnaryKind::Sigmoid, 0.0, 0.0).permute(&[1, 0]).unary(UnaryKind::Powf, 2.0, 0.0);
            h.reduce(1, false, 1.0).unary(UnaryKind::Softplus, 0.0, 0.0)
        },
    );
}

#[test]
fn no_grad_records_nothing() {
    require_gpu();
    let x = Tensor::from_slice(&[1.0, 2.0, 3.0], &[3]).unwrap().var();
    let y = no_grad(|| x.mul(&x).unwrap().sum_all().unwrap());
    assert!(!y.requires_grad(), "an op under no_grad must not require a gradient");
    assert!(y.backward().is_err(), "backward through a no_grad result must be an error, not a panic");
    // Recording resumes after the scope.
    assert!(x.mul(&x).unwrap().requires_grad());
}

#[test]
fn detach_stops_the_gradient() {
    require_gpu();
    let xs = [0.5f32, -1.0, 2.0];
    let x = Tensor::from_slice(&xs, &[3]).unwrap().var();
    // y = sum(x * detach(x)) => dy/dx = detach(x) = x (the detached factor is a constant)
    let y = x.mul(&x.detach()).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap().get(&x).unwrap().to_vec().unwrap();
    assert_eq!(g, xs.to_vec());
    let d = x.detach();
    assert!(!d.requires_grad());
    assert_eq!(d.to_vec().unwrap(), xs.to_vec());
}

#[test]
fn gradients_match_reference_after_reuse_across_steps() {
    // Two backward passes over fresh graphs from the same leaf give the same gradient (no stale state).
    require_gpu();
    let x = Tensor::from_slice(&[0.3, -0.7, 1.1, 2.0], &[2, 2]).unwrap().var();
    let grad = || x.matmul(&x).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec().unwrap();
    let (a, b) = (grad(), grad());
    assert_eq!(a, b);
    let xc = CpuTensor::from_f32(&[0.3, -0.7, 1.1, 2.0], &[2, 2]);
    // d/dX sum(X X) = 1 X^T + X^T 1  (ones matrices)
    let ones = CpuTensor::new(vec![1.0; 4], &[2, 2]);
    let want = ones.matmul_t(&xc, false, true).binary(BinaryKind::Add, &xc.matmul_t(&ones, true, false));
    assert_close("d/dX sum(XX)", &a, &want.data, 1e-5);
}

/// The gradient check excuses points that sit on a kink (relu at an exact zero has no derivative to compare)
/// and still fails a rule that is wrong where the function is smooth.
#[test]
fn gradcheck_excuses_kinks_and_catches_wrong_rules() {
    require_gpu();
    let mut rng = test_rng("gradcheck kinks");
    let tol = kiln_graph::gradcheck::Tolerance::default();
    // 80 quarter steps in [-2, 2]: about one in 17 is an exact zero.
    let relu = kiln_graph::gradcheck::gradcheck("relu on a grid", &[(&[80], Domain::Grid)], &mut rng, tol, |t| t[0].relu(), |t| t[0].unary(UnaryKind::Relu, 0.0, 0.0));
    assert!(relu.is_ok(), "{relu:?}");
    // x * detach(x) has the forward of x^2 and half its gradient.
    let wrong = kiln_graph::gradcheck::gradcheck("half a square", &[(&[40], Domain::Grid)], &mut rng, tol, |t| t[0].mul(&t[0].detach()), |t| t[0].binary(BinaryKind::Mul, &t[0]));
    let e = wrong.expect_err("a wrong rule passed").to_string();
    assert!(e.contains("finite differences"), "{e}");
}
