//! GANs (kiln_models::gan) and the classifier-feature Frechet distance (kiln_models::frechet): the losses
//! against their formulas, WGAN-GP's penalty on a critic whose answer is known, the 1-D sanity case, DCGAN's
//! shapes and bad input, and the Frechet distance's closed forms.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::{Rng, Tensor};
use kiln_models::frechet::{frechet_distance, mean_and_covariance, symmetric_eigen, SampleScores};
use kiln_models::gan::{discriminator_loss, generator_loss, gradient_penalty, train_gan_1d, Discriminator, Generator, GeneratorLoss};
use kiln_nn::VarStore;
use kiln_tests::{assert_close, check_op, require_gpu, test_rng, Domain};

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

#[test]
fn gan_losses_match_their_formulas() {
    let mean = |t: &CpuTensor, f: &dyn Fn(f64) -> f64| t.data.iter().map(|&v| f(v)).sum::<f64>() / t.data.len() as f64;
    check_op(
        "discriminator loss",
        &[(&[7, 1], Domain::Any), (&[5, 1], Domain::Any)],
        |x| discriminator_loss(&x[0], &x[1]),
        |x| CpuTensor::new(vec![mean(&x[0], &|v| softplus(-v)) + mean(&x[1], &softplus)], &[]),
    );
    check_op(
        "minimax generator loss",
        &[(&[6, 1], Domain::Any)],
        |x| generator_loss(&x[0], GeneratorLoss::Minimax),
        |x| {
            // log(1 - sigmoid(l)) = -softplus(l)
            CpuTensor::new(vec![mean(&x[0], &|v| (1.0 - 1.0 / (1.0 + (-v).exp())).ln())], &[])
        },
    );
    check_op(
        "non-saturating generator loss",
        &[(&[6, 1], Domain::Any)],
        |x| generator_loss(&x[0], GeneratorLoss::NonSaturating),
        |x| CpuTensor::new(vec![mean(&x[0], &|v| -(1.0 / (1.0 + (-v).exp())).ln())], &[]),
    );
}

#[test]
fn the_gradient_penalty_of_a_linear_critic_is_known() {
    require_gpu();
    // c(x) = w . x has gradient w at every point: the penalty is lambda (|w| - 1)^2, its gradient
    // 2 lambda (|w| - 1) w / |w|, whatever the images and the mixing.
    let mut rng = test_rng("gradient penalty");
    let w_values: Vec<f32> = (0..12).map(|_| rng.normal() as f32 * 0.6).collect();
    let w = Tensor::from_slice(&w_values, &[12, 1]).unwrap().var();
    let real = Tensor::randn(&[5, 1, 3, 4], 1.0, &mut rng).unwrap();
    let fake = Tensor::randn(&[5, 1, 3, 4], 1.0, &mut rng).unwrap();
    let critic = |x: &Tensor| x.reshape(&[5, 12])?.matmul(&w);
    let gp = gradient_penalty(&critic, &real, &fake, 10.0, &mut Rng::new(1)).unwrap();
    let norm = w_values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    assert_close("penalty", &gp.to_vec().unwrap(), &[10.0 * (norm - 1.0).powi(2)], 1e-4);
    let g = gp.backward().unwrap().get(&w).unwrap().to_vec().unwrap();
    let want: Vec<f64> = w_values.iter().map(|&v| 20.0 * (norm - 1.0) * v as f64 / norm).collect();
    assert_close("its gradient", &g, &want, 1e-3);
    let e = gradient_penalty(&critic, &real, &Tensor::zeros(&[4, 1, 3, 4]).unwrap(), 10.0, &mut Rng::new(1)).unwrap_err().to_string();
    assert!(e.contains("[5, 1, 3, 4]") && e.contains("[4, 1, 3, 4]"), "{e}");
}

#[test]
fn a_1d_gan_learns_a_gaussians_mean_and_spread() {
    require_gpu();
    let r = train_gan_1d(4.0, 1.25, 1500, GeneratorLoss::NonSaturating, 42).unwrap();
    eprintln!("{r:?}");
    assert!((r.mean - 4.0).abs() < 0.3 && (r.std - 1.25).abs() < 0.3, "generated mean {:.3}, std {:.3} for N(4, 1.25^2)", r.mean, r.std);
}

#[test]
fn dcgan_networks_have_their_shapes_and_reject_bad_sizes() {
    require_gpu();
    let mut vs = VarStore::new(2);
    let g = Generator::new(&mut vs, 16, 8).unwrap();
    let d = Discriminator::new(&mut vs, 8, true).unwrap();
    vs.finish().unwrap();
    let images = g.forward(&Tensor::randn(&[3, 16], 1.0, &mut Rng::new(4)).unwrap()).unwrap();
    assert_eq!(images.shape(), &[3, 1, 28, 28]);
    assert!(images.to_vec().unwrap().iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(d.forward(&images).unwrap().shape(), &[3, 1]);
    let e = Generator::new(&mut VarStore::new(1), 0, 8).err().expect("latent 0").to_string();
    assert!(e.contains("latent size"), "{e}");
}

#[test]
fn the_collapse_check_counts_the_classes_and_the_largest_share() {
    let scores = SampleScores { frechet: 1.0, class_shares: vec![0.0, 0.25, 0.0, 0.6, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0] };
    assert_eq!(scores.spread(), (3, 0.6));
    assert_eq!(SampleScores { frechet: 0.0, class_shares: vec![0.0; 10] }.spread(), (0, 0.0));
}

#[test]
fn frechet_distance_has_its_closed_forms() {
    let mut rng = test_rng("frechet");
    // 1-D: (m1 - m2)^2 + (s1 - s2)^2 with the sample statistics.
    let a: Vec<f32> = (0..4000).map(|_| (1.0 + 2.0 * rng.normal()) as f32).collect();
    let b: Vec<f32> = (0..3000).map(|_| (-0.5 + 0.7 * rng.normal()) as f32).collect();
    let (ma, va) = mean_and_covariance(&a, 1);
    let (mb, vb) = mean_and_covariance(&b, 1);
    let want = (ma[0] - mb[0]).powi(2) + (va[0].sqrt() - vb[0].sqrt()).powi(2);
    assert!((frechet_distance(&a, &b, 1).unwrap() - want).abs() < 1e-9 * (1.0 + want));
    // A set against itself: 0. Rotating both sets by one orthogonal matrix changes nothing.
    let d = 6;
    let x: Vec<f32> = (0..500 * d).map(|i| (rng.normal() * (1.0 + (i % d) as f64)) as f32).collect();
    let y: Vec<f32> = (0..400 * d).map(|i| (rng.normal() + 0.3 * (i % d) as f64) as f32).collect();
    assert!(frechet_distance(&x, &x, d).unwrap().abs() < 1e-6);
    let base = frechet_distance(&x, &y, d).unwrap();
    let (_, q) = symmetric_eigen(&mean_and_covariance(&y, d).1, d);
    let q = &q;
    let rotate = |rows: &[f32]| -> Vec<f32> { rows.chunks(d).flat_map(|r| (0..d).map(move |j| (0..d).map(|k| r[k] as f64 * q[k * d + j]).sum::<f64>() as f32)).collect() };
    let turned = frechet_distance(&rotate(&x), &rotate(&y), d).unwrap();
    assert!((turned - base).abs() < 1e-3 * base, "{turned} vs {base}");
    // The eigen-decomposition reconstructs its matrix.
    let (_, s) = mean_and_covariance(&x, d);
    let (e, v) = symmetric_eigen(&s, d);
    for i in 0..d {
        for j in 0..d {
            let back: f64 = (0..d).map(|k| v[i * d + k] * e[k] * v[j * d + k]).sum();
            assert!((back - s[i * d + j]).abs() < 1e-9 * (1.0 + s[i * d + j].abs()));
        }
    }
    assert!(frechet_distance(&x, &y[..3], d).is_err());
}
