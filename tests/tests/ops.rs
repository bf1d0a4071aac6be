//! Every op: GPU forward against the CPU reference on fresh random inputs (odd sizes included), and every
//! backward rule against central finite differences of the f64 reference.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::kernels::{BinaryKind, UnaryKind};
use kiln_graph::loss;
use kiln_graph::Tensor;
use kiln_tests::{check_op, Domain};

const SIZES: [usize; 4] = [1, 7, 33, 129];

fn unary_case(name: &str, kind: UnaryKind, a: f32, b: f32, domain: Domain, f: impl Fn(&Tensor) -> kiln_graph::Result<Tensor>) {
    for n in SIZES {
        check_op(&format!("{name}[{n}]"), &[(&[n, 3], domain)], |x| f(&x[0]), |x| x[0].unary(kind, a as f64, b as f64));
    }
}

#[test]
fn neg() {
    unary_case("neg", UnaryKind::Neg, 0.0, 0.0, Domain::Any, |x| x.neg());
}
#[test]
fn exp() {
    unary_case("exp", UnaryKind::Exp, 0.0, 0.0, Domain::Any, |x| x.exp());
}
#[test]
fn log() {
    unary_case("log", UnaryKind::Log, 0.0, 0.0, Domain::Positive, |x| x.log());
}
#[test]
fn sqrt() {
    unary_case("sqrt", UnaryKind::Sqrt, 0.0, 0.0, Domain::Positive, |x| x.sqrt());
}
#[test]
fn abs() {
    unary_case("abs", UnaryKind::Abs, 0.0, 0.0, Domain::AwayFromZero, |x| x.abs());
}
#[test]
fn sigmoid() {
    unary_case("sigmoid", UnaryKind::Sigmoid, 0.0, 0.0, Domain::Any, |x| x.sigmoid());
}
#[test]
fn tanh() {
    unary_case("tanh", UnaryKind::Tanh, 0.0, 0.0, Domain::Any, |x| x.tanh());
}
#[test]
fn relu() {
    unary_case("relu", UnaryKind::Relu, 0.0, 0.0, Domain::AwayFromZero, |x| x.relu());
}
#[test]
fn leaky_relu() {
    unary_case("leaky_relu", UnaryKind::LeakyRelu, 0.1, 0.0, Domain::AwayFromZero, |x| x.leaky_relu(0.1));
}
#[test]
fn softplus() {
    unary_case("softplus", UnaryKind::Softplus, 0.0, 0.0, Domain::Any, |x| x.softplus());
}
#[test]
fn clamp() {
    unary_case("clamp", UnaryKind::Clamp, -0.75, 1.25, Domain::Any, |x| x.clamp(-0.75, 1.25));
}
#[test]
fn powf_integer_on_any_sign() {
    unary_case("powf3", UnaryKind::Powf, 3.0, 0.0, Domain::AwayFromZero, |x| x.powf(3.0));
}
#[test]
fn powf_even_on_any_sign() {
    unary_case("powf2", UnaryKind::Powf, 2.0, 0.0, Domain::AwayFromZero, |x| x.powf(2.0));
}
#[test]
fn powf_fractional() {
    unary_case("powf1.5", UnaryKind::Powf, 1.5, 0.0, Domain::Positive, |x| x.powf(1.5));
}
#[test]
fn affine() {
    unary_case("affine", UnaryKind::Affine, -1.5, 0.25, Domain::Any, |x| x.affine(-1.5, 0.25));
}

fn binary_case(name: &str, kind: BinaryKind, a: &[usize], b: &[usize], db: Domain, f: impl Fn(&Tensor, &Tensor) -> kiln_graph::Result<Tensor>) {
    check_op(name, &[(a, Domain::AwayFromZero), (b, db)], |x| f(&x[0], &x[1]), |x| x[0].binary(kind, &x[1]));
}

#[test]
fn add_sub_mul_div_same_shape() {
    for n in SIZES {
        binary_case(&format!("add[{n}]"), BinaryKind::Add, &[n, 5], &[n, 5], Domain::Any, |a, b| a.add(b));
        binary_case(&format!("sub[{n}]"), BinaryKind::Sub, &[n, 5], &[n, 5], Domain::Any, |a, b| a.sub(b));
        binary_case(&format!("mul[{n}]"), BinaryKind::Mul, &[n, 5], &[n, 5], Domain::Any, |a, b| a.mul(b));
        binary_case(&format!("div[{n}]"), BinaryKind::Div, &[n, 5], &[n, 5], Domain::Positive, |a, b| a.div(b));
    }
}

#[test]
fn broadcasting_binary_ops() {
    let cases: [(&[usize], &[usize]); 4] = [(&[7, 33], &[33]), (&[7, 1, 5], &[1, 3, 5]), (&[129, 3], &[129, 1]), (&[2, 3, 4], &[])];
    for (a, b) in cases {
        binary_case(&format!("broadcast_add{a:?}{b:?}"), BinaryKind::Add, a, b, Domain::Any, |x, y| x.broadcast_add(y));
        binary_case(&format!("broadcast_sub{a:?}{b:?}"), BinaryKind::Sub, a, b, Domain::Any, |x, y| x.broadcast_sub(y));
        binary_case(&format!("broadcast_mul{a:?}{b:?}"), BinaryKind::Mul, a, b, Domain::Any, |x, y| x.broadcast_mul(y));
        binary_case(&format!("broadcast_div{a:?}{b:?}"), BinaryKind::Div, a, b, Domain::Positive, |x, y| x.broadcast_div(y));
        binary_case(&format!("broadcast_maximum{a:?}{b:?}"), BinaryKind::Maximum, a, b, Domain::Any, |x, y| x.broadcast_maximum(y));
        binary_case(&format!("broadcast_minimum{a:?}{b:?}"), BinaryKind::Minimum, a, b, Domain::Any, |x, y| x.broadcast_minimum(y));
    }
}

#[test]
fn sum_mean_max_over_axes() {
    for n in SIZES {
        let shape = [3, n, 5];
        for axis in 0..3 {
            check_op(
                &format!("sum{shape:?} axis {axis}"),
                &[(&shape, Domain::Any)],
                |x| x[0].sum(&[axis], false),
                |x| {
                    let r = x[0].reduce(axis, false, 1.0);
                    let mut s = shape.to_vec();
                    s.remove(axis);
                    r.reshape(&s)
                },
            );
            check_op(&format!("mean{shape:?} axis {axis}"), &[(&shape, Domain::Any)], |x| x[0].mean(&[axis], true), |x| x[0].reduce(axis, false, 1.0 / shape[axis] as f64));
            check_op(&format!("max{shape:?} axis {axis}"), &[(&shape, Domain::Any)], |x| x[0].max(axis, true), |x| x[0].reduce(axis, true, 1.0));
        }
        check_op(&format!("sum over two axes [{n}]"), &[(&shape, Domain::Any)], |x| x[0].sum(&[0, 2], true), |x| x[0].reduce(0, false, 1.0).reduce(2, false, 1.0));
    }
}

#[test]
fn matmul_plain_and_transposed() {
    // Odd sizes take the scalar kernel; multiples of 4 along the contiguous axes take matmul_vec4.
    for &(m, k, n) in &[(1, 1, 1), (7, 33, 5), (33, 7, 129), (129, 65, 3), (12, 64, 20), (33, 36, 12), (8, 12, 7), (4, 4, 4)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a: Vec<usize> = if ta { vec![k, m] } else { vec![m, k] };
            let b: Vec<usize> = if tb { vec![n, k] } else { vec![k, n] };
            check_op(&format!("matmul {m}x{k}x{n} ta={ta} tb={tb}"), &[(&a, Domain::Any), (&b, Domain::Any)], |x| x[0].matmul_t(&x[1], ta, tb), |x| x[0].matmul_t(&x[1], ta, tb));
        }
    }
}

#[test]
fn batched_matmul() {
    check_op("bmm [3,7,33]@[3,33,5]", &[(&[3, 7, 33], Domain::Any), (&[3, 33, 5], Domain::Any)], |x| x[0].matmul(&x[1]), |x| x[0].matmul_t(&x[1], false, false));
    check_op("bmm vec4 [3,8,12]@[3,12,16]", &[(&[3, 8, 12], Domain::Any), (&[3, 12, 16], Domain::Any)], |x| x[0].matmul(&x[1]), |x| x[0].matmul_t(&x[1], false, false));
    check_op("bmm vec4 shared transposed [2,8,12]^T@[4,8]^T", &[(&[2, 8, 12], Domain::Any), (&[4, 8], Domain::Any)], |x| x[0].matmul_t(&x[1], true, true), |x| x[0].matmul_t(&x[1], true, true));
    check_op("bmm shared [4,5,7]@[7,9]", &[(&[4, 5, 7], Domain::Any), (&[7, 9], Domain::Any)], |x| x[0].matmul(&x[1]), |x| x[0].matmul_t(&x[1], false, false));
    check_op("bmm shared transposed [4,7,5]^T@[9,7]^T", &[(&[4, 7, 5], Domain::Any), (&[9, 7], Domain::Any)], |x| x[0].matmul_t(&x[1], true, true), |x| x[0].matmul_t(&x[1], true, true));
}

#[test]
fn permute_transpose_reshape_broadcast_to() {
    check_op("permute [2,3,5]->(2,0,1)", &[(&[2, 3, 5], Domain::Any)], |x| x[0].permute(&[2, 0, 1]), |x| x[0].permute(&[2, 0, 1]));
    check_op("transpose [33,7]", &[(&[33, 7], Domain::Any)], |x| x[0].t(), |x| x[0].permute(&[1, 0]));
    check_op("reshape [6,5]->[3,10]", &[(&[6, 5], Domain::Any)], |x| x[0].reshape(&[3, 10])?.exp(), |x| x[0].reshape(&[3, 10]).unary(UnaryKind::Exp, 0.0, 0.0));
    check_op("broadcast_to [3,1]->[2,3,7]", &[(&[3, 1], Domain::Any)], |x| x[0].broadcast_to(&[2, 3, 7]), |x| x[0].broadcast_to(&[2, 3, 7]));
}

#[test]
fn slice_and_concat() {
    check_op("slice [7,33] axis 1 5..17", &[(&[7, 33], Domain::Any)], |x| x[0].slice(1, 5, 12), |x| x[0].slice(1, 5, 12));
    check_op("slice [129,3] axis 0 100..129", &[(&[129, 3], Domain::Any)], |x| x[0].slice(0, 100, 29), |x| x[0].slice(0, 100, 29));
    check_op(
        "concat axis 1",
        &[(&[3, 2, 4], Domain::Any), (&[3, 5, 4], Domain::Any), (&[3, 1, 4], Domain::Any)],
        |x| Tensor::concat(&[&x[0], &x[1], &x[2]], 1),
        |x| CpuTensor::concat(&[&x[0], &x[1], &x[2]], 1),
    );
    check_op("concat axis 0", &[(&[1, 7], Domain::Any), (&[33, 7], Domain::Any)], |x| Tensor::concat(&[&x[0], &x[1]], 0), |x| CpuTensor::concat(&[&x[0], &x[1]], 0));
}

#[test]
fn index_select_with_repeats() {
    let idx = [4u32, 0, 4, 2, 6, 6, 1];
    let gpu_idx = Tensor::from_u32(&idx, &[idx.len()]).unwrap();
    check_op("index_select axis 0", &[(&[7, 5], Domain::Any)], |x| x[0].index_select(0, &gpu_idx), |x| x[0].index_select(0, &idx));
    check_op("index_select axis 1", &[(&[3, 7, 2], Domain::Any)], |x| x[0].index_select(1, &gpu_idx), |x| x[0].index_select(1, &idx));
}

#[test]
fn one_hot_matches_reference() {
    kiln_tests::require_gpu();
    let mut rng = kiln_tests::test_rng("one_hot");
    for n in SIZES {
        let labels: Vec<u32> = (0..n).map(|_| rng.below(10) as u32).collect();
        let t = Tensor::one_hot(&Tensor::from_u32(&labels, &[n]).unwrap(), 10).unwrap();
        assert_eq!(t.to_vec().unwrap(), CpuTensor::one_hot(&labels, 10).to_f32());
    }
}

#[test]
fn softmax_and_log_softmax() {
    for n in SIZES {
        check_op(&format!("softmax [{n},10] axis 1"), &[(&[n, 10], Domain::Any)], |x| x[0].softmax(1), |x| x[0].softmax(1, false));
        check_op(&format!("log_softmax [{n},10] axis 1"), &[(&[n, 10], Domain::Any)], |x| x[0].log_softmax(1), |x| x[0].softmax(1, true));
    }
    check_op("softmax [4,7,3] axis 1", &[(&[4, 7, 3], Domain::Any)], |x| x[0].softmax(1), |x| x[0].softmax(1, false));
    check_op("log_softmax [4,7,3] axis 0", &[(&[4, 7, 3], Domain::Any)], |x| x[0].log_softmax(0), |x| x[0].softmax(0, true));
}

#[test]
fn softmax_is_stable_for_huge_logits() {
    kiln_tests::require_gpu();
    let x = Tensor::from_slice(&[1000.0, 1001.0, -1000.0, 3.0e4, 3.0e4, 0.0], &[2, 3]).unwrap();
    let y = x.softmax(1).unwrap().to_vec().unwrap();
    let ly = x.log_softmax(1).unwrap().to_vec().unwrap();
    assert!(y.iter().chain(&ly).all(|v| v.is_finite()), "softmax overflowed: {y:?} {ly:?}");
    assert!((y[1] - 0.7310586).abs() < 1e-5 && (y[3] - 0.5).abs() < 1e-6);
}

#[test]
fn losses_against_reference() {
    for n in SIZES {
        check_op(&format!("mse [{n},3]"), &[(&[n, 3], Domain::Any), (&[n, 3], Domain::Any)], |x| loss::mse_loss(&x[0], &x[1]), |x| CpuTensor::new(vec![x[0].mse(&x[1])], &[]));
        check_op(
            &format!("bce_with_logits [{n}]"),
            &[(&[n], Domain::Any), (&[n], Domain::Positive)],
            |x| loss::bce_with_logits(&x[0].scale(8.0)?, &x[1].scale(0.5)?),
            |x| {
                let logits = x[0].unary(UnaryKind::Affine, 8.0, 0.0);
                let t = x[1].unary(UnaryKind::Affine, 0.5, 0.0);
                CpuTensor::new(vec![logits.bce_with_logits(&t)], &[])
            },
        );
        let mut rng = kiln_tests::test_rng("labels");
        let labels: Vec<u32> = (0..n).map(|_| rng.below(10) as u32).collect();
        let gl = Tensor::from_u32(&labels, &[n]).unwrap();
        check_op(
            &format!("cross_entropy [{n},10]"),
            &[(&[n, 10], Domain::Any)],
            |x| loss::cross_entropy(&x[0].scale(5.0)?, &gl),
            |x| CpuTensor::new(vec![x[0].unary(UnaryKind::Affine, 5.0, 0.0).cross_entropy(&labels)], &[]),
        );
    }
}

/// loss::cross_entropy runs fused (one kernel each way, Op::CrossEntropy): against the CPU reference on long
/// rows, and against the one-hot formula it replaces, gradients included; a label out of range makes the loss
/// and that row's gradient NaN in both (an error that shows, not a silent zero).
#[test]
fn fused_cross_entropy_matches_the_reference_and_the_one_hot_formula() {
    let mut rng = kiln_tests::test_rng("fused cross entropy");
    for classes in [1usize, 7, 130] {
        let n = 1 + rng.below(40);
        let labels: Vec<u32> = (0..n).map(|_| rng.below(classes) as u32).collect();
        let gl = Tensor::from_u32(&labels, &[n]).unwrap();
        check_op(
            &format!("cross_entropy [{n},{classes}]"),
            &[(&[n, classes], Domain::Any)],
            |x| loss::cross_entropy(&x[0].scale(3.0)?, &gl),
            |x| CpuTensor::new(vec![x[0].unary(UnaryKind::Affine, 3.0, 0.0).cross_entropy(&labels)], &[]),
        );

        let mut labels = labels.clone();
        labels[rng.below(n)] = classes as u32 + 3;
        let gl = Tensor::from_u32(&labels, &[n]).unwrap();
        let x = Tensor::randn(&[n, classes], 2.0, &mut rng).unwrap().var();
        let before = kiln_graph::backend::thread_stats().dispatches;
        let fused = loss::cross_entropy(&x, &gl).unwrap();
        let dispatches = kiln_graph::backend::thread_stats().dispatches - before;
        assert_eq!(dispatches, 2, "the fused loss is one kernel and a mean");
        let formula = loss::cross_entropy_one_hot(&x, &Tensor::one_hot(&gl, classes).unwrap()).unwrap();
        let (a, b) = (fused.to_scalar().unwrap(), formula.to_scalar().unwrap());
        assert!(a.is_nan() && b.is_nan(), "[{n},{classes}] a label out of range: loss {a} (fused), {b} (formula)");
        let bad_row = labels.iter().position(|&l| l as usize >= classes).unwrap();
        let ga = fused.backward().unwrap().get(&x).unwrap().to_vec().unwrap();
        let gb = formula.backward().unwrap().get(&x).unwrap().to_vec().unwrap();
        for (i, (p, q)) in ga.iter().zip(&gb).enumerate() {
            if i / classes == bad_row {
                assert!(p.is_nan() && q.is_nan(), "[{n},{classes}] gradient {i} of the bad row: {p} vs {q}");
            } else {
                assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "[{n},{classes}] gradient {i}: {p} vs {q}");
            }
        }
    }
}

#[test]
fn bce_is_stable_for_huge_logits() {
    kiln_tests::require_gpu();
    let x = Tensor::from_slice(&[200.0, -200.0, 0.0], &[3]).unwrap();
    let t = Tensor::from_slice(&[1.0, 0.0, 1.0], &[3]).unwrap();
    let l = loss::bce_with_logits(&x, &t).unwrap().to_scalar().unwrap();
    assert!((l - (2f32.ln() / 3.0)).abs() < 1e-6, "bce {l}");
}

/// Every optimizer update against its formula in f64 on random state: odd lengths (Adam's 4-wide kernel on CPU
/// adapters runs a prefix and leaves the rest to the scalar kernel), weight decay on a prefix only, a run that
/// starts inside the buffer and ends before other values, which must not change.
#[test]
fn optimizer_updates_match_their_formulas() {
    use kiln_graph::kernels::{optimizer_step, UpdateRule};
    kiln_tests::require_gpu();
    let mut rng = kiln_tests::test_rng("optimizer updates");
    let rules = [
        UpdateRule::Sgd { momentum: 0.0, nesterov: false },
        UpdateRule::Sgd { momentum: 0.9, nesterov: true },
        UpdateRule::RmsProp { alpha: 0.99, eps: 1e-8 },
        UpdateRule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 3, decoupled: false },
        UpdateRule::Adam { beta1: 0.8, beta2: 0.99, eps: 1e-6, step: 1, decoupled: true },
    ];
    // Both Adam kernels: storage reads (GPUs) and texture reads, 4 per invocation (CPU adapters).
    for (rule, textures) in rules.iter().flat_map(|r| [(*r, false), (*r, true)]) {
        kiln_tests::with_settings_device(|g| {
            kiln_graph::kernels::set_texture_reads(g, Some(textures));
            for n in [1usize, 7, 1001, 4096 + 13] {
                // The run: [skip, skip + n) of buffers of skip + n + 9 values, skip a multiple of 8 floats (32 bytes).
                let skip = 8 * rng.below(3);
                let total = skip + n + 9;
                let mut host: Vec<Vec<f32>> = (0..4).map(|_| (0..total).map(|_| rng.normal() as f32).collect()).collect();
                host[3].iter_mut().for_each(|v| *v = v.abs()); // second moments are non-negative (RMSprop's is state1)
                if matches!(rule, UpdateRule::RmsProp { .. }) {
                    host[2].iter_mut().for_each(|v| *v = v.abs());
                }
                let bufs: Vec<_> = host.iter().map(|h| g.upload(bytemuck::cast_slice(h), "optimizer test").unwrap()).collect();
                let run = |i: usize| bufs[i].sub(4 * skip as u64, 4 * n as u64);
                let (lr, wd, decay_end) = (0.01f32, 0.1f32, n / 2);
                optimizer_step(rule, &run(1), &run(0), &run(2), &run(3), n, decay_end, lr, wd).unwrap();
                let got: Vec<Vec<f32>> = bufs[1..].iter().map(|b| bytemuck::cast_slice(&g.read(b).unwrap()[..4 * total]).to_vec()).collect();
                for i in 0..total {
                    let (gr, w, s1, s2) = (host[0][i] as f64, host[1][i] as f64, host[2][i] as f64, host[3][i] as f64);
                    let want = if i < skip || i >= skip + n {
                        (w, s1, s2) // outside the run: untouched
                    } else {
                        let d = if i - skip < decay_end { wd as f64 } else { 0.0 };
                        let lr = lr as f64;
                        match rule {
                            UpdateRule::Sgd { momentum, nesterov } => {
                                let gg = gr + d * w;
                                let v = momentum as f64 * s1 + gg;
                                let step = if nesterov { gg + momentum as f64 * v } else { v };
                                (w - lr * step, v, s2)
                            }
                            UpdateRule::RmsProp { alpha, eps } => {
                                let gg = gr + d * w;
                                let s = alpha as f64 * s1 + (1.0 - alpha as f64) * gg * gg;
                                (w - lr * gg / (s.sqrt() + eps as f64), s, s2)
                            }
                            UpdateRule::Adam { beta1, beta2, eps, step, decoupled } => {
                                let (b1, b2) = (beta1 as f64, beta2 as f64);
                                let (gg, ww) = if decoupled { (gr, w * (1.0 - lr * d)) } else { (gr + d * w, w) };
                                let m = b1 * s1 + (1.0 - b1) * gg;
                                let v = b2 * s2 + (1.0 - b2) * gg * gg;
                                let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
                                (ww - lr * (m / c1) / ((v / c2).sqrt() + eps as f64), m, v)
                            }
                        }
                    };
                    let want_state2 = if matches!(rule, UpdateRule::Adam { .. }) { want.2 } else { s2 };
                    for (what, got, want) in [("param", got[0][i], want.0), ("state1", got[1][i], want.1), ("state2", got[2][i], want_state2)] {
                        assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{rule:?} textures {textures} n {n} skip {skip}: {what}[{i}] = {got}, want {want}");
                    }
                }
            }
        });
    }
}

/// PyTorch's `ignore_index` and `label_smoothing`: the mean over the rows not ignored of -sum_j q_j log p_j,
/// q = (1 - eps) one_hot + eps / classes, against the f64 formula and finite differences.
#[test]
fn cross_entropy_ignores_a_label_and_smooths_like_pytorch() {
    let mut rng = kiln_tests::test_rng("cross entropy options");
    for (classes, eps, ignore) in [(7usize, 0.1f32, Some(0u32)), (5, 0.0, Some(3)), (9, 0.25, None), (4, 0.2, Some(u32::MAX))] {
        let n = 3 + rng.below(20);
        let mut labels: Vec<u32> = (0..n).map(|_| rng.below(classes) as u32).collect();
        if let Some(i) = ignore {
            labels[0] = i;
            labels[n - 1] = i;
            // At least one row counts (every row ignored is 0 / 0, NaN, as in PyTorch: not what is tested here).
            if labels[1..n - 1].iter().all(|&l| l == i) {
                labels[1] = (i.wrapping_add(1)) % classes as u32;
            }
        }
        let gl = Tensor::from_u32(&labels, &[n]).unwrap();
        let opts = loss::CrossEntropyOptions { ignore_index: ignore, label_smoothing: eps };
        let reference = |x: &CpuTensor| -> f64 {
            let (mut total, mut counted) = (0.0, 0usize);
            for (r, &l) in labels.iter().enumerate() {
                if Some(l) == ignore {
                    continue;
                }
                let row = &x.data[r * classes..(r + 1) * classes];
                let m = row.iter().cloned().fold(f64::MIN, f64::max);
                let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let q = |j: usize| (1.0 - eps as f64) * (j as u32 == l) as u8 as f64 + eps as f64 / classes as f64;
                total -= (0..classes).map(|j| q(j) * (row[j] - lse)).sum::<f64>();
                counted += 1;
            }
            total / counted as f64
        };
        check_op(
            &format!("cross_entropy [{n},{classes}] eps {eps} ignore {ignore:?}"),
            &[(&[n, classes], Domain::Any)],
            |x| loss::cross_entropy_with(&x[0].scale(3.0)?, &gl, opts),
            |x| CpuTensor::new(vec![reference(&x[0].unary(UnaryKind::Affine, 3.0, 0.0))], &[]),
        );
    }
    // Every row ignored: 0 / 0, NaN, as PyTorch; a smoothing outside [0, 1] is an error.
    let x = Tensor::randn(&[2, 3], 1.0, &mut rng).unwrap();
    let all = Tensor::from_u32(&[1, 1], &[2]).unwrap();
    assert!(loss::cross_entropy_with(&x, &all, loss::CrossEntropyOptions { ignore_index: Some(1), label_smoothing: 0.0 }).unwrap().to_scalar().unwrap().is_nan());
    let err = loss::cross_entropy_with(&x, &all, loss::CrossEntropyOptions { ignore_index: None, label_smoothing: 1.5 }).expect_err("eps 1.5");
    assert!(err.to_string().contains("label_smoothing"), "{err}");
}
