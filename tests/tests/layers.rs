//! Batch normalization and dropout: training and evaluation behaviour against references.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::kernels::{BinaryKind, UnaryKind};
use kiln_graph::Tensor;
use kiln_nn::{BatchNorm, Dropout, Layer, Module, VarStore};
use kiln_tests::{assert_close, check_op, check_op_with, require_gpu, test_rng, with_settings_device, Domain};

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
    check_op(
        "batch norm dense [9,4]",
        &[(&[9, 4], Domain::Any)],
        |t| {
            let mut vs = VarStore::new(0);
            let bn = BatchNorm::new(&mut vs, "bn1d", 4)?;
            vs.finish()?;
            bn.forward(&t[0])
        },
        |t| bn_reference(&t[0].reshape(&[9, 4, 1, 1]), 1e-5).reshape(&[9, 4]),
    );
}

/// Batch norm's fused op (Tensor::batch_norm): the forward pass against the CPU formula with random gamma and
/// beta and each fused activation, every input's gradient (x, gamma, beta) against finite differences, on
/// conv-shaped inputs with planes under, over and at a lane count, and dense ones with more samples than lanes.
#[test]
fn fused_batch_norm_forward_and_backward() {
    use kiln_graph::kernels::BiasAct;
    for (act, kind) in [(BiasAct::Identity, None), (BiasAct::Relu, Some(UnaryKind::Relu)), (BiasAct::Sigmoid, Some(UnaryKind::Sigmoid)), (BiasAct::Tanh, Some(UnaryKind::Tanh))] {
        for shape in [&[4usize, 3, 5, 7][..], &[2, 5, 17, 19], &[9, 4], &[300, 3], &[3, 2, 16, 16]] {
            let c = shape[1];
            let mut plane = shape.to_vec();
            plane.resize(4, 1);
            let cpu = move |t: &[CpuTensor]| {
                let x = t[0].unary(UnaryKind::Affine, 1.0, 5.0).reshape(&plane);
                let y = bn_reference(&x, 1e-5).binary(BinaryKind::Mul, &t[1].reshape(&[1, c, 1, 1])).binary(BinaryKind::Add, &t[2].reshape(&[1, c, 1, 1]));
                let y = match kind {
                    Some(k) => y.unary(k, 0.0, 0.0),
                    None => y,
                };
                y.reshape(&t[0].shape)
            };
            // Values around 5 with spread 1: the normalisation has real work to do, and subtracting the mean in
            // f32 costs digits (1.3e-6 absolute was seen against a 1e-4 relative tolerance floored at 1% of the
            // largest output: 1.01e-4), so the forward is held to 3e-4 here.
            let gpu = |t: &[Tensor]| t[0].affine(1.0, 5.0)?.batch_norm(&t[1], &t[2], 1e-5, act, None);
            let tol = kiln_graph::gradcheck::Tolerance { forward: 3e-4, ..Default::default() };
            check_op_with(&format!("fused batch norm {act:?} {shape:?}"), &[(shape, Domain::Any), (&[c], Domain::Any), (&[c], Domain::Any)], tol, gpu, cpu);
        }
    }
    require_gpu();
    let x = Tensor::zeros(&[2, 3, 4]).unwrap();
    let e = x.batch_norm(&Tensor::ones(&[4]).unwrap(), &Tensor::zeros(&[3]).unwrap(), 1e-5, BiasAct::Identity, None).unwrap_err().to_string();
    assert!(e.contains("[2, 3, 4]") && e.contains("[4]"), "{e}");
    let big = Tensor::zeros(&[kiln_graph::kernels::BN_FUSED_MAX_COUNT + 1, 1]).unwrap();
    assert!(big.batch_norm(&Tensor::ones(&[1]).unwrap(), &Tensor::zeros(&[1]).unwrap(), 1e-5, BiasAct::Identity, None).is_err());
}

/// The BatchNorm layer with fusion on (the fused kernels, with the following ReLU folded in by Sequential)
/// and off (the composite formula): same outputs, gradients and running statistics, and fewer dispatches.
#[test]
fn fused_batch_norm_layer_matches_the_composite_formula() {
    // Fusion is a device setting: flipped on the tests' settings device, never on the shared default one.
    with_settings_device(|dev| {
        require_gpu();
        let mut rng = test_rng("bn fusion");
        let x = Tensor::randn(&[6, 4, 9, 11], 2.0, &mut rng).unwrap().affine(1.0, 3.0).unwrap();
        let w = Tensor::randn(x.shape(), 1.0, &mut rng).unwrap();
        let run = |fused: bool| {
            kiln_nn::set_fusion(dev, fused);
            let mut vs = VarStore::new(5);
            let net = kiln_nn::Sequential::new().push(BatchNorm::new(&mut vs, "bn", 4).unwrap()).push(kiln_nn::Activation::Relu).push(BatchNorm::new(&mut vs, "bn2", 4).unwrap());
            vs.finish().unwrap();
            // Non-trivial scale and shift, the same in both runs.
            for (i, p) in vs.params().filter(|p| !vs.is_buffer(p.name())).enumerate() {
                let v: Vec<f32> = (0..4).map(|j| 0.5 + 0.3 * (i * 4 + j) as f32 / 7.0 - if i % 2 == 1 { 1.0 } else { 0.0 }).collect();
                p.tensor().unwrap().device().write(p.tensor().unwrap().storage(), bytemuck::cast_slice(&v)).unwrap();
            }
            let x = x.detach().var();
            let before = kiln_graph::backend::thread_stats().dispatches;
            let y = net.forward(&x).unwrap();
            let dispatches = kiln_graph::backend::thread_stats().dispatches - before;
            let g = y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let trainable = |p: &&kiln_nn::Param| !vs.is_buffer(p.name());
            let mut grads: Vec<Vec<f32>> = vs.params().filter(trainable).map(|p| g.get(p.tensor().unwrap()).unwrap().to_vec().unwrap()).collect();
            grads.push(g.get(&x).unwrap().to_vec().unwrap());
            let running: Vec<Vec<f32>> = vs.params().filter(|p| vs.is_buffer(p.name())).map(|b| b.tensor().unwrap().to_vec().unwrap()).collect();
            (y.to_vec().unwrap(), grads, running, dispatches)
        };
        let (y_fused, g_fused, r_fused, d_fused) = run(true);
        let (y_plain, g_plain, r_plain, d_plain) = run(false);
        assert!(d_fused * 4 <= d_plain, "forward dispatches fused {d_fused}, composite {d_plain}");
        // Relative to the largest value of each vector: gamma's and beta's gradients are sums of ~600 terms
        // that cancel, so a small one carries the rounding of the large terms (seed 1796073324288024796: -1.08395
        // vs -1.08399 in a vector reaching 6.0).
        let close = |a: &[f32], b: &[f32]| {
            let scale = 1.0 + b.iter().fold(0f32, |m, v| m.max(v.abs()));
            a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 2e-5 * scale)
        };
        assert!(close(&y_fused, &y_plain), "outputs differ");
        for (i, (a, b)) in g_fused.iter().zip(&g_plain).enumerate() {
            assert!(close(a, b), "gradient {i} differs: {:?} vs {:?}", &a[..4.min(a.len())], &b[..4.min(b.len())]);
        }
        assert_eq!(r_fused.len(), 4);
        for (i, (a, b)) in r_fused.iter().zip(&r_plain).enumerate() {
            assert!(close(a, b), "running statistic {i} differs: {a:?} vs {b:?}");
        }
    })
}

/// Every parameter starts at its own initial values whatever buffers (batch norm's running statistics) are
/// declared around it: buffers live outside the flat parameter buffer, and their initial values once landed
/// at its offset 0, over the first convolution's weights.
#[test]
fn parameters_keep_their_initial_values_beside_buffers() {
    require_gpu();
    let mut rng = test_rng("varstore init");
    let seed = rng.below(1000) as u64;
    let declare = |vs: &mut VarStore| -> Vec<kiln_nn::Param> {
        let conv = kiln_nn::Conv2d::new(vs, "conv", 1, 8, 3, Default::default()).unwrap();
        let bn = BatchNorm::new(vs, "bn", 8).unwrap();
        let lin = kiln_nn::Linear::new(vs, "fc", 5, 3, kiln_nn::Init::XavierUniform).unwrap();
        vec![conv.weight.clone(), conv.bias.clone().unwrap(), bn.weight.clone(), bn.bias.clone(), bn.running_mean.clone(), bn.running_var.clone(), lin.weight.clone()]
    };
    let mut vs = VarStore::new(seed);
    let params = declare(&mut vs);
    // The same declarations draw the same values from the same seed: what each parameter must hold.
    let mut again = VarStore::new(seed);
    declare(&mut again);
    let mut draw = kiln_graph::Rng::new(seed);
    let want: Vec<Vec<f32>> = [
        (kiln_nn::Init::HeNormal, vec![8, 1, 3, 3]),
        (kiln_nn::Init::Zeros, vec![8]),
        (kiln_nn::Init::Constant(1.0), vec![8]),
        (kiln_nn::Init::Zeros, vec![8]),
        (kiln_nn::Init::Zeros, vec![8]),
        (kiln_nn::Init::Constant(1.0), vec![8]),
        (kiln_nn::Init::XavierUniform, vec![3, 5]),
    ]
    .into_iter()
    .map(|(init, shape)| init.values(&shape, &mut draw))
    .collect();
    vs.finish().unwrap();
    for (p, want) in params.iter().zip(&want) {
        assert_eq!(&p.tensor().unwrap().to_vec().unwrap(), want, "{} lost its initial values", p.name());
    }
    assert!(want[0].iter().any(|&v| v != 1.0 && v != 0.0));
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

#[test]
fn fused_bias_and_activation_forward_and_backward() {
    use kiln_graph::kernels::BiasAct;
    // act(x + bias) along the channel axis, every activation, against the CPU reference composed of the unfused
    // ops; the backward rule against finite differences (relu away from its kink). Both kernel pairs: storage
    // reads (GPUs) and texture reads with 4 elements per invocation (CPU adapters).
    for textures in [false, true] {
        with_settings_device(|dev| {
            kiln_graph::kernels::set_texture_reads(dev, Some(textures));
            bias_act_cases();
        });
    }
    require_gpu();
    let x = Tensor::zeros(&[2, 3]).unwrap();
    let e = x.bias_act(&Tensor::zeros(&[4]).unwrap(), 1, BiasAct::Relu).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4]"), "{e}");
}

fn bias_act_cases() {
    use kiln_graph::kernels::BiasAct;
    for (act, kind, domain) in [
        (BiasAct::Identity, None, Domain::Any),
        (BiasAct::Relu, Some(UnaryKind::Relu), Domain::AwayFromZero),
        (BiasAct::Sigmoid, Some(UnaryKind::Sigmoid), Domain::Any),
        (BiasAct::Tanh, Some(UnaryKind::Tanh), Domain::Any),
    ] {
        let cpu = move |t: &[CpuTensor], bias_shape: &[usize]| {
            let pre = t[0].binary(BinaryKind::Add, &t[1].reshape(bias_shape));
            match kind {
                Some(k) => pre.unary(k, 0.0, 0.0),
                None => pre,
            }
        };
        // Conv-shaped [n, c, h, w] with a per-channel bias, and Linear-shaped [n, out].
        check_op(&format!("bias_act {act:?} [3,5,4,7]"), &[(&[3, 5, 4, 7], Domain::Any), (&[5], domain)], |t| t[0].bias_act(&t[1], 1, act), |t| cpu(t, &[1, 5, 1, 1]));
        check_op(&format!("bias_act {act:?} [9,33]"), &[(&[9, 33], Domain::Any), (&[33], domain)], |t| t[0].bias_act(&t[1], 1, act), |t| cpu(t, &[1, 33]));
    }
}

#[test]
fn fusion_in_sequential_matches_the_unfused_layers() {
    // Fusion is a device setting: flipped on the tests' settings device, never on the shared default one.
    with_settings_device(|dev| {
        // LeNet-5 has four conv/linear + ReLU pairs and a final bias: the fused network must give the same output
        // and the same gradients as the layers run one by one.
        require_gpu();
        let mut vs = VarStore::new(3);
        let net = kiln_models::cnn::lenet5(&mut vs, [1, 28, 28], 10).unwrap();
        vs.finish().unwrap();
        let mut rng = test_rng("fusion");
        let x = Tensor::randn(&[4, 1, 28, 28], 1.0, &mut rng).unwrap();
        let run = |fused: bool| {
            kiln_nn::set_fusion(dev, fused);
            let before = kiln_graph::backend::thread_stats().dispatches;
            let y = net.forward(&x).unwrap();
            let dispatches = kiln_graph::backend::thread_stats().dispatches - before;
            let g = y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f32>> = vs.params().map(|p| g.get(p.tensor().unwrap()).unwrap().to_vec().unwrap()).collect();
            (y.to_vec().unwrap(), grads, dispatches)
        };
        let (y_fused, g_fused, d_fused) = run(true);
        let (y_plain, g_plain, d_plain) = run(false);
        // Four activations folded into their layers' bias kernels.
        assert_eq!(d_plain - d_fused, 4, "forward dispatches fused {d_fused}, unfused {d_plain}");
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()));
        assert!(close(&y_fused, &y_plain), "outputs differ");
        for (i, (a, b)) in g_fused.iter().zip(&g_plain).enumerate() {
            assert!(close(a, b), "gradient of parameter {i} differs");
        }
    })
}
