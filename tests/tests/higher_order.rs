//! Gradients of gradients (`backward_create_graph`): Hessian-vector products against finite differences of
//! the first-order gradient, a WGAN-GP gradient penalty for a small conv critic against finite differences of
//! an f64 reference, max pooling and index_select, and custom ops on the tape.

use kiln_graph::custom::CustomOp;
use kiln_graph::kernels::BiasAct;
use kiln_graph::{Conv2dGeom, Pool2dGeom, Result, Rng, Tensor};
use kiln_tests::{assert_close, random_values, require_gpu, test_rng, Domain};

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn constant(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::from_slice(&f32s(&random_values(kiln_graph::shape::numel(shape), Domain::Any, rng)), shape).unwrap()
}

/// The step: small enough that the truncation error (eps^2 times the fourth derivative) stays under the
/// tolerance, large enough that f32 rounding of the gradients (1e-7 / eps) does too.
const EPS: f64 = 2e-3;

/// H v of the scalar `f` at a random x, from `backward_create_graph`, against (grad f(x + eps v) - grad f(x -
/// eps v)) / 2 eps with first-order gradients.
fn check_hvp(name: &str, shape: &[usize], rng: &mut Rng, f: impl Fn(&Tensor) -> Result<Tensor>) {
    let x0 = random_values(kiln_graph::shape::numel(shape), Domain::Any, rng);
    check_hvp_at(name, shape, x0, rng, f)
}

/// [`check_hvp`] at a given x.
fn check_hvp_at(name: &str, shape: &[usize], x0: Vec<f64>, rng: &mut Rng, f: impl Fn(&Tensor) -> Result<Tensor>) {
    let v = random_values(x0.len(), Domain::Any, rng);
    let x = Tensor::from_slice(&f32s(&x0), shape).unwrap().var();
    let grads = f(&x).unwrap().backward_create_graph().unwrap_or_else(|e| panic!("{name}: {e}"));
    let gx = grads.get(&x).expect("gradient of x");
    assert!(gx.requires_grad(), "{name}: a create_graph gradient must be differentiable");
    let vt = Tensor::from_slice(&f32s(&v), shape).unwrap();
    let hv = gx.mul(&vt).unwrap().sum_all().unwrap().backward().unwrap_or_else(|e| panic!("{name}: second backward: {e}"));
    let hv = hv.get(&x).expect("Hv").to_vec().unwrap();

    let grad_at = |sign: f64| -> Vec<f32> {
        let xs: Vec<f64> = x0.iter().zip(&v).map(|(a, b)| a + sign * EPS * b).collect();
        let x = Tensor::from_slice(&f32s(&xs), shape).unwrap().var();
        f(&x).unwrap().backward().unwrap().get(&x).unwrap().to_vec().unwrap()
    };
    let (up, down) = (grad_at(1.0), grad_at(-1.0));
    let fd: Vec<f64> = up.iter().zip(&down).map(|(a, b)| (*a as f64 - *b as f64) / (2.0 * EPS)).collect();
    assert_close(&format!("{name}: Hv vs finite differences of the gradient"), &hv, &fd, 2e-2);
}

#[test]
fn hessian_vector_product_of_elementwise_matmul_and_softmax() {
    require_gpu();
    let mut rng = test_rng("hvp_mlp");
    let (w, r) = (constant(&[5, 7], &mut rng), constant(&[3, 7], &mut rng));
    check_hvp("tanh, matmul, softmax, sigmoid, powf", &[3, 5], &mut rng, |x| {
        let y = x.matmul(&w)?.tanh()?.softmax(1)?.mul(&r)?.sum_all()?;
        let z = x.sigmoid()?.mul(x)?.add(&x.powf(3.0)?.scale(0.1)?)?.sum_all()?;
        let s = x.slice(1, 1, 3)?.exp()?.sum_all()?;
        y.add(&z)?.add(&s)
    });
}

#[test]
fn hessian_vector_product_through_fused_ops() {
    // Batch norm, bias+activation and cross-entropy are fused kernels on the default device; their second
    // derivatives go through the composite formulas.
    require_gpu();
    let mut rng = test_rng("hvp_fused");
    let (gamma, beta) = (constant(&[3], &mut rng), constant(&[3], &mut rng));
    let (w, b) = (constant(&[12, 5], &mut rng), constant(&[5], &mut rng));
    let labels = Tensor::from_u32(&[0, 3, 4, 1], &[4]).unwrap();
    check_hvp("batch_norm, bias_act, cross_entropy", &[4, 3, 2, 2], &mut rng, |x| {
        let h = x.batch_norm(&gamma, &beta, 1e-5, BiasAct::Tanh, None)?.reshape(&[4, 12])?;
        let logits = h.matmul(&w)?.bias_act(&b, 1, BiasAct::Sigmoid)?;
        kiln_graph::loss::cross_entropy(&logits, &labels)
    });
}

#[test]
fn hessian_vector_product_through_convolution_and_average_pooling() {
    require_gpu();
    let mut rng = test_rng("hvp_conv");
    // Weights small enough that tanh does not saturate: finite differences of a saturated tanh's gradient
    // need a far smaller step than f32 allows.
    let (w1, w2) = (constant(&[3, 2, 3, 3], &mut rng).scale(0.3).unwrap(), constant(&[2, 3, 3, 3], &mut rng).scale(0.3).unwrap());
    let r = constant(&[2, 2, 3, 3], &mut rng);
    let same = Conv2dGeom { padding: [1, 1], ..Default::default() };
    let strided = Conv2dGeom { stride: [2, 2], ..Default::default() };
    check_hvp("conv2d (padded, strided), tanh, avg_pool2d", &[2, 2, 7, 7], &mut rng, |x| {
        let h = x.conv2d(&w1, same)?.tanh()?.conv2d(&w2, strided)?.tanh()?;
        h.avg_pool2d(Pool2dGeom::square(1))?.mul(&r)?.sum_all()?.add(&x.avg_pool2d(Pool2dGeom::new(3, 2, 1))?.powf(2.0)?.sum_all()?)
    });
}

/// The critic of the gradient-penalty test: D(x) = leaky_relu(conv3x3(x) + b, 0.2) flattened, then linear.
/// x [n, 1, 6, 6], w [3, 1, 3, 3], b [3], lw [48, 1], lb [1].
fn critic(x: &Tensor, p: &[Tensor]) -> Result<Tensor> {
    let n = x.shape()[0];
    let h = x.conv2d(&p[0], Conv2dGeom::default())?.bias_act(&p[1], 1, BiasAct::Identity)?.leaky_relu(0.2)?;
    h.reshape(&[n, 48])?.matmul(&p[2])?.broadcast_add(&p[3])
}

/// The penalty mean_b (||grad_x D(x_b)||_2 - 1)^2 in f64, from the critic's derivative written out by hand.
fn penalty_reference(x: &[f64], n: usize, w: &[f64], b: &[f64], lw: &[f64]) -> f64 {
    let mut total = 0.0;
    for s in 0..n {
        let xs = &x[s * 36..(s + 1) * 36];
        let mut gx = [0.0f64; 36];
        for o in 0..3 {
            for i in 0..4 {
                for j in 0..4 {
                    let mut pre = b[o];
                    for ki in 0..3 {
                        for kj in 0..3 {
                            pre += xs[(i + ki) * 6 + j + kj] * w[o * 9 + ki * 3 + kj];
                        }
                    }
                    let d = lw[o * 16 + i * 4 + j] * if pre > 0.0 { 1.0 } else { 0.2 };
                    for ki in 0..3 {
                        for kj in 0..3 {
                            gx[(i + ki) * 6 + j + kj] += d * w[o * 9 + ki * 3 + kj];
                        }
                    }
                }
            }
        }
        let norm = gx.iter().map(|v| v * v).sum::<f64>().sqrt();
        total += (norm - 1.0).powi(2);
    }
    total / n as f64
}

#[test]
fn gradient_penalty_of_a_conv_critic_matches_finite_differences() {
    require_gpu();
    let mut rng = test_rng("gradient_penalty");
    let n = 2;
    let shapes: [&[usize]; 4] = [&[3, 1, 3, 3], &[3], &[48, 1], &[1]];
    let x0 = f32s(&random_values(n * 36, Domain::Any, &mut rng));
    let p0: Vec<Vec<f32>> = shapes.iter().map(|s| f32s(&random_values(kiln_graph::shape::numel(s), Domain::Any, &mut rng).iter().map(|v| v * 0.5).collect::<Vec<_>>())).collect();
    let x = Tensor::from_slice(&x0, &[n, 1, 6, 6]).unwrap().var();
    let params: Vec<Tensor> = p0.iter().zip(shapes).map(|(v, s)| Tensor::from_slice(v, s).unwrap().var()).collect();

    let d = critic(&x, &params).unwrap().sum_all().unwrap();
    let gx = d.backward_create_graph().unwrap().get(&x).unwrap().clone();
    let norms = gx.reshape(&[n, 36]).unwrap().powf(2.0).unwrap().sum(&[1], false).unwrap().sqrt().unwrap();
    let gp = norms.add_scalar(-1.0).unwrap().powf(2.0).unwrap().mean_all().unwrap();
    let grads = gp.backward().unwrap();

    let as64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    let (xd, mut pd) = (as64(&x0), p0.iter().map(|v| as64(v)).collect::<Vec<_>>());
    let reference = |pd: &[Vec<f64>]| penalty_reference(&xd, n, &pd[0], &pd[1], &pd[2]);
    assert_close("gradient penalty", &[gp.to_scalar().unwrap()], &[reference(&pd)], 1e-4);
    for (k, (name, p)) in ["conv weight", "conv bias", "linear weight", "linear bias"].iter().zip(&params).enumerate() {
        // The bias terms only move the leaky kink, so their exact derivative is zero (or no gradient at all).
        let got = grads.get(p).map(|g| g.to_vec().unwrap()).unwrap_or_else(|| vec![0.0; p.numel()]);
        let eps = 1e-6;
        let fd: Vec<f64> = (0..p.numel())
            .map(|j| {
                pd[k][j] += eps;
                let up = reference(&pd);
                pd[k][j] -= 2.0 * eps;
                let down = reference(&pd);
                pd[k][j] += eps;
                (up - down) / (2.0 * eps)
            })
            .collect();
        assert_close(&format!("d penalty / d {name}"), &got, &fd, 2e-3);
    }
}

#[test]
fn hessian_vector_product_through_max_pooling_and_index_select() {
    require_gpu();
    let mut rng = test_rng("hvp_max_pool_index_select");
    // Distinct values 0.028 apart, so no step of the finite differences (at most 0.004) changes a window's max.
    let n = 2 * 2 * 6 * 6;
    let mut x0: Vec<f64> = (0..n).map(|i| -2.0 + 4.0 * i as f64 / n as f64).collect();
    rng.shuffle(&mut x0);
    let r = constant(&[2, 2, 3, 3], &mut rng);
    check_hvp_at("tanh, max_pool2d (2x2, and 3x3 stride 2 padded), powf", &[2, 2, 6, 6], x0, &mut rng, |x| {
        let (y, _) = x.tanh()?.max_pool2d(Pool2dGeom::square(2))?;
        let (z, _) = x.max_pool2d(Pool2dGeom::new(3, 2, 1))?;
        y.powf(2.0)?.mul(&r)?.sum_all()?.add(&z.powf(3.0)?.sum_all()?)
    });
    // An embedding lookup with repeated rows: their gradients add up.
    let idx = Tensor::from_u32(&[3, 0, 3, 4, 1, 3], &[6]).unwrap();
    let r = constant(&[6, 4], &mut rng);
    check_hvp("index_select (repeated rows), tanh", &[5, 4], &mut rng, |x| x.index_select(0, &idx)?.tanh()?.powf(2.0)?.mul(&r)?.sum_all());
}

#[test]
fn powers_at_zero_have_their_real_second_derivative() {
    // The second derivative of x^2 is 2 x^0, and WGSL leaves pow(0, 0) undefined; the CPU reference says 1.
    require_gpu();
    let x0 = [0.0, -0.0, 1.5, -2.0, 0.0];
    let ones = Tensor::from_slice(&f32s(&x0), &[5]).unwrap().powf(0.0).unwrap().to_vec().unwrap();
    assert_eq!(ones, vec![1.0; 5], "x^0 is 1 everywhere, 0 included");
    let mut rng = test_rng("hvp_powers_at_zero");
    check_hvp_at("powf 2 and 3 at zero", &[5], x0.to_vec(), &mut rng, |x| x.powf(2.0)?.add(&x.powf(3.0)?)?.sum_all());
}

/// x^3 as a custom op whose backward is written with tensor ops, so it is differentiable again.
struct Cube;

impl CustomOp for Cube {
    fn name(&self) -> &str {
        "cube"
    }
    fn forward(&self, x: &[&Tensor]) -> Result<Tensor> {
        x[0].mul(x[0])?.mul(x[0])
    }
    fn backward(&self, x: &[&Tensor], _y: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.mul(&x[0].mul(x[0])?.scale(3.0)?)?)])
    }
}

/// A custom op whose backward returns a gradient of the wrong shape.
struct BadGrad;

impl CustomOp for BadGrad {
    fn name(&self) -> &str {
        "bad_grad"
    }
    fn forward(&self, x: &[&Tensor]) -> Result<Tensor> {
        x[0].scale(2.0)
    }
    fn backward(&self, _x: &[&Tensor], _y: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.sum_all()?)])
    }
}

/// 2x with a backward that, like a raw kernel, records nothing (its gradient is cut from the graph).
struct OpaqueDouble;

impl CustomOp for OpaqueDouble {
    fn name(&self) -> &str {
        "opaque_double"
    }
    fn forward(&self, x: &[&Tensor]) -> Result<Tensor> {
        x[0].scale(2.0)
    }
    fn backward(&self, _x: &[&Tensor], _y: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.detach().scale(2.0)?)])
    }
}

#[test]
fn custom_ops_record_on_the_tape_and_differentiate_twice() {
    require_gpu();
    let mut rng = test_rng("custom_op_tape");
    let xs = random_values(9, Domain::Any, &mut rng);
    let x = Tensor::from_slice(&f32s(&xs), &[9]).unwrap().var();
    let y = Tensor::custom_op(Cube, &[&x]).unwrap();
    assert!(y.requires_grad());
    assert_close("cube forward", &y.to_vec().unwrap(), &xs.iter().map(|v| v.powi(3)).collect::<Vec<_>>(), 1e-5);
    // d/dx sum(x^3) = 3x^2, and d/dx sum(3x^2) = 6x.
    let g = y.sum_all().unwrap().backward_create_graph().unwrap().get(&x).unwrap().clone();
    assert_close("cube gradient", &g.to_vec().unwrap(), &xs.iter().map(|v| 3.0 * v * v).collect::<Vec<_>>(), 1e-5);
    let gg = g.sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec().unwrap();
    assert_close("cube second derivative", &gg, &xs.iter().map(|v| 6.0 * v).collect::<Vec<_>>(), 1e-5);

    let bad = Tensor::custom_op(BadGrad, &[&x]).unwrap().sum_all().unwrap().backward().err().expect("a shape error");
    assert!(bad.to_string().contains("bad_grad") && bad.to_string().contains("[9]"), "{bad}");
    // A backward the tape cannot see works for first derivatives, and is an error (not silently missing
    // second-order terms) under create_graph.
    let y = Tensor::custom_op(OpaqueDouble, &[&x]).unwrap().powf(2.0).unwrap().sum_all().unwrap();
    assert_close("opaque first derivative", &y.backward().unwrap().get(&x).unwrap().to_vec().unwrap(), &xs.iter().map(|v| 8.0 * v).collect::<Vec<_>>(), 1e-5);
    let err = y.backward_create_graph().err().expect("an error").to_string();
    assert!(err.contains("opaque_double") && err.contains("not differentiable"), "{err}");
}
