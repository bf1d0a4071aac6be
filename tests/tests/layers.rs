//! Batch normalization and dropout: training and evaluation behaviour against references.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::kernels::{BinaryKind, UnaryKind};
use kiln_graph::Tensor;
use kiln_nn::{BatchNorm, Dropout, Module, VarStore};
use kiln_tests::{assert_close, check_op, require_gpu, test_rng, Domain};

/// The training-mode batch norm of [n, c, h, w] with gamma = 1, beta = 0, on the CPU.
fn bn_reference(x: &CpuTensor, eps: f64) -> CpuTensor {
    let count = (x.shape[0] * x.shape[2] * x.shape[3]) as f64;
    let mean = x.reduce(0, false, 1.0).reduce(2, false, 1.0).reduce(3, false, 1.0 / count);
    let centered = x.binary(BinaryKind::Sub, &mean);
    let var = centered.binary(BinaryKind::Mul, &centered).reduce(0, false, 1.0).reduce(2, false, 1.0).reduce(3, false, 1.0 / count);
    centered.binary(BinaryKind::Div, &var.unary(UnaryKind::Affine, 1.0, eps).unary(UnaryKind::Sqrt, 0.0, 0.0))
}

#[test]
fn batch_norm_training_forward_and_backward() {
    require_gpu();
    let mut vs = VarStore::new(0);
    let bn = BatchNorm::new(&mut vs, "bn", 3).unwrap();
    vs.finish().unwrap();
    // Values around 5 with spread 2: the normalisation has real work to do.
    check_op("batch norm [4,3,5,7]", &[(&[4, 3, 5, 7], Domain::Any)], |t| bn.forward(&t[0].affine(1.0, 5.0)?), |t| bn_reference(&t[0].unary(UnaryKind::Affine, 1.0, 5.0), 1e-5));
    check_op("batch norm dense [9,4]", &[(&[9, 4], Domain::Any)], |t| {
        let mut vs = VarStore::new(0);
        let bn = BatchNorm::new(&mut vs, "bn1d", 4)?;
        vs.finish()?;
        bn.forward(&t[0])
    }, |t| bn_reference(&t[0].reshape(&[9, 4, 1, 1]), 1e-5).reshape(&[9, 4]));
}

#[test]
fn batch_norm_running_statistics_and_eval() {
    require_gpu();
    let mut rng = test_rng("bn_running");
    let mut vs = VarStore::new(0);
    let mut bn = BatchNorm::new(&mut vs, "bn", 2).unwrap();
    vs.finish().unwrap();
    let xs: Vec<f32> = (0..8 * 2).map(|_| rng.range(0.0, 4.0) as f32).collect();
    let x = Tensor::from_slice(&xs, &[8, 2]).unwrap();
    bn.forward(&x).unwrap();
    let col = |c: usize| xs.iter().skip(c).step_by(2).map(|&v| v as f64).collect::<Vec<_>>();
    let (mut want_mean, mut want_var) = (vec![], vec![]);
    for c in 0..2 {
        let v = col(c);
        let m = v.iter().sum::<f64>() / 8.0;
        let unbiased = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 7.0;
        want_mean.push(0.1 * m);
        want_var.push(0.9 + 0.1 * unbiased);
    }
    assert_close("running_mean", &bn.running_mean.tensor().unwrap().to_vec().unwrap(), &want_mean, 1e-5);
    assert_close("running_var", &bn.running_var.tensor().unwrap().to_vec().unwrap(), &want_var, 1e-5);
    // Eval mode uses the running statistics and leaves them alone.
    bn.set_training(false);
    let y = bn.forward(&x).unwrap().to_vec().unwrap();
    let want: Vec<f64> = xs.iter().enumerate().map(|(i, &v)| (v as f64 - want_mean[i % 2]) / (want_var[i % 2] + 1e-5).sqrt()).collect();
    assert_close("eval output", &y, &want, 1e-4);
    assert_close("running_mean unchanged", &bn.running_mean.tensor().unwrap().to_vec().unwrap(), &want_mean, 1e-6);
}

#[test]
fn dropout_is_inverted_seeded_and_identity_in_eval() {
    require_gpu();
    let x = Tensor::ones(&[64, 100]).unwrap().var();
    let mut d = Dropout::new(0.3, 42).unwrap();
    let y = d.forward(&x).unwrap().to_vec().unwrap();
    let keep = 1.0 / 0.7f32;
    assert!(y.iter().all(|&v| v == 0.0 || (v - keep).abs() < 1e-6), "values must be 0 or 1/keep");
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
    assert!((kept - 0.7).abs() < 0.03, "kept fraction {kept}");
    // The gradient flows through the kept units only, scaled the same way.
    let g = d.forward(&x).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec().unwrap();
    assert_eq!(g, d.last_mask().unwrap().to_vec().unwrap());
    // Same seed, same masks; a fresh call draws a fresh mask.
    let d2 = Dropout::new(0.3, 42).unwrap();
    assert_eq!(d2.forward(&x).unwrap().to_vec().unwrap(), y);
    let second = d2.forward(&x).unwrap().to_vec().unwrap();
    assert_ne!(second, y);
    // A resumed run moves the stream to its step and draws the same masks.
    let mut resumed = Dropout::new(0.3, 42).unwrap();
    resumed.set_rng_position(1);
    assert_eq!(resumed.forward(&x).unwrap().to_vec().unwrap(), second);
    d.set_training(false);
    assert_eq!(d.forward(&x).unwrap().to_vec().unwrap(), vec![1.0; 6400]);
    assert!(Dropout::new(1.0, 0).is_err());
}
