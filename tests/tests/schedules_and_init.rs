//! Learning-rate schedules against PyTorch's formulas, initialisers' statistics against their definitions, and
//! the shape layers (AdaptiveAvgPool2d, Flatten) against hand-computed values.

use kiln_graph::{Rng, Tensor};
use kiln_nn::schedule::Schedule;
use kiln_nn::{AdaptiveAvgPool2d, Flatten, Init, Layer, LrSchedule};
use kiln_tests::{assert_close, require_gpu};

#[test]
fn schedules_follow_pytorchs_formulas() {
    let base = 0.1f32;
    let close = |got: f32, want: f64, what: &str| assert!((got as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3), "{what}: {got} vs {want}");
    // StepLR(step_size=3, gamma=0.5)
    let s: Schedule = "step:3:0.5".parse().unwrap();
    for step in 0..10u64 {
        close(s.lr(base, step, 10), 0.1 * 0.5f64.powi((step / 3) as i32), &format!("step {step}"));
    }
    // ExponentialLR(gamma=0.9)
    let e: Schedule = "exp:0.9".parse().unwrap();
    for step in [0u64, 1, 5, 20] {
        close(e.lr(base, step, 30), 0.1 * 0.9f64.powi(step as i32), &format!("exp {step}"));
    }
    // CosineAnnealingLR(T_max=total, eta_min=min_factor * lr): eta_min + (lr - eta_min)(1 + cos(pi t / T)) / 2
    let c: Schedule = "cosine:0.1".parse().unwrap();
    for step in [0u64, 25, 50, 75, 100] {
        let eta_min = 0.01;
        close(c.lr(base, step, 100), eta_min + (0.1 - eta_min) * (1.0 + (std::f64::consts::PI * step as f64 / 100.0).cos()) / 2.0, &format!("cosine {step}"));
    }
    // A linear warm-up over 4 steps, then the schedule counted from the end of the warm-up.
    let w: Schedule = "cosine+warmup:4".parse().unwrap();
    assert_eq!(w.kind, LrSchedule::Cosine { min_factor: 0.0 });
    for step in 0..4u64 {
        close(w.lr(base, step, 104), 0.1 * (step + 1) as f64 / 4.0, &format!("warm-up {step}"));
    }
    close(w.lr(base, 54, 104), 0.05, "half way through the cosine after the warm-up");
    assert!("step:0.5".parse::<Schedule>().is_err() && "cosine+warmup:x".parse::<Schedule>().is_err());
}

/// Mean and variance of `v`.
fn moments(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (mean, v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n)
}

#[test]
fn initialisers_have_their_defined_spread() {
    let mut rng = Rng::new(17);
    // A conv weight [out 64, in 32, 3, 3]: fan_in 288, fan_out 576, as PyTorch computes them.
    let shape = [64, 32, 3, 3];
    assert_eq!(kiln_nn::init::fans(&shape), (288, 576));
    let (fi, fo) = (288.0, 576.0);
    let cases = [
        (Init::XavierUniform, 2.0 / (fi + fo), Some((6.0f64 / (fi + fo)).sqrt())),
        (Init::XavierNormal, 2.0 / (fi + fo), None),
        (Init::HeUniform, 2.0 / fi, Some((6.0f64 / fi).sqrt())),
        (Init::HeNormal, 2.0 / fi, None),
        (Init::ScaledNormal, 1.0 / fi, None),
        (Init::Normal { std: 0.02 }, 0.0004, None),
        (Init::Uniform { lo: -0.5, hi: 0.5 }, 1.0 / 12.0, Some(0.5)),
    ];
    for (init, variance, bound) in cases {
        let v = init.values(&shape, &mut rng);
        assert_eq!(v.len(), 64 * 32 * 9);
        let (mean, var) = moments(&v);
        // 18,432 draws: the sample variance is within about 2% of the true one (several standard errors).
        assert!((var / variance - 1.0).abs() < 0.04, "{init:?}: variance {var:.3e}, defined {variance:.3e}");
        assert!(mean.abs() < 4.0 * (variance / v.len() as f64).sqrt() + 1e-9, "{init:?}: mean {mean:.3e}");
        if let Some(b) = bound {
            assert!(v.iter().all(|&x| (x as f64).abs() <= b), "{init:?}: a value outside +-{b}");
            assert!(v.iter().any(|&x| (x as f64).abs() > 0.95 * b), "{init:?}: the range is not used up to +-{b}");
        }
    }
    assert!(Init::Zeros.values(&[3, 4], &mut rng).iter().all(|&x| x == 0.0));
    assert!(Init::Constant(0.25).values(&[5], &mut rng).iter().all(|&x| x == 0.25));
}

#[test]
fn adaptive_average_pooling_and_flatten() {
    require_gpu();
    // [1, 2, 4, 6] -> AdaptiveAvgPool2d([2, 3]): each output averages a 2x2 block.
    let x: Vec<f32> = (0..48).map(|v| v as f32).collect();
    let t = Tensor::from_slice(&x, &[1, 2, 4, 6]).unwrap();
    let pool = AdaptiveAvgPool2d([2, 3]);
    assert_eq!(pool.output_shape(&[1, 2, 4, 6]).unwrap(), [1, 2, 2, 3]);
    let y = pool.forward(&t).unwrap();
    assert_eq!(y.shape(), &[1, 2, 2, 3]);
    let want: Vec<f64> = (0..2)
        .flat_map(|c| (0..2).flat_map(move |i| (0..3).map(move |j| [(0, 0), (0, 1), (1, 0), (1, 1)].iter().map(|(a, b)| (c * 24 + (2 * i + a) * 6 + 2 * j + b) as f64).sum::<f64>() / 4.0)))
        .collect();
    assert_close("adaptive average pool", &y.to_vec().unwrap(), &want, 1e-6);
    let err = pool.forward(&Tensor::full(&[1, 2, 5, 6], 1.0).unwrap()).expect_err("5 rows do not split into 2").to_string();
    assert!(err.contains("multiples") && err.contains("[1, 2, 5, 6]"), "{err}");
    // Flatten keeps the batch axis and the values in row-major order.
    let f = Flatten.forward(&t).unwrap();
    assert_eq!(f.shape(), &[1, 48]);
    assert_eq!(f.to_vec().unwrap(), x);
    assert_eq!(Flatten.output_shape(&[7, 3, 2, 2]).unwrap(), [7, 12]);
}
