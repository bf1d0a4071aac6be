//! A public gradient check in the spirit of `torch.autograd.gradcheck`: an op's GPU forward against a CPU
//! reference, and its GPU backward against central finite differences of that reference in f64.
//!
//! The scalar differentiated is `sum(op(x) * r)` with `r` random, so every output element weighs in. Each
//! input element's derivative is checked (a random sample of 48 for inputs over 256 elements). A point that
//! misses and whose objective is demonstrably not smooth there (one-sided slopes that differ) is excused, as
//! long as no more than a quarter of the points (or one) are.

use crate::cpu::CpuTensor;
use crate::error::{KilnError, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Where an input's random values are drawn from.
#[derive(Clone, Copy, Debug)]
pub enum Domain {
    /// Uniform in [-2, 2).
    Any,
    /// Uniform in [0.2, 2): log, sqrt, fractional powers, divisors.
    Positive,
    /// |x| in [0.1, 2): away from the kink of relu/abs and from ties.
    AwayFromZero,
    /// Quarter steps in [-2, 2]: exact zeros and ties, to exercise the kink handling of [`gradcheck`].
    Grid,
}

/// `n` values from `domain`.
pub fn random_values(n: usize, domain: Domain, rng: &mut Rng) -> Vec<f64> {
    (0..n)
        .map(|_| match domain {
            Domain::Any => rng.range(-2.0, 2.0),
            Domain::Positive => rng.range(0.2, 2.0),
            Domain::Grid => (rng.below(17) as f64 - 8.0) * 0.25,
            Domain::AwayFromZero => {
                let v = rng.range(0.1, 2.0);
                if rng.uniform() < 0.5 {
                    -v
                } else {
                    v
                }
            }
        })
        .collect()
}

/// Tolerances of [`gradcheck`], as relative errors `|got - want| / (|want| + 1% of the largest |want|)`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub forward: f64,
    pub gradient: f64,
    /// The finite-difference step on the f64 reference.
    pub eps: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { forward: 1e-4, gradient: 2e-3, eps: 1e-5 }
    }
}

/// The worst relative error of `got` against `want` and where it is: (error, index). NaN counts as infinite.
pub fn max_relative_error(got: &[f32], want: &[f64]) -> (f64, usize) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    let mut worst = (0.0, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / (w.abs() + 0.01 * scale + 1e-6);
        let err = if err.is_nan() { f64::INFINITY } else { err };
        if err > worst.0 {
            worst = (err, i);
        }
    }
    worst
}

/// An error naming `what` when `got` is not within `tol` of `want`.
pub fn check_close(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<f64> {
    if got.len() != want.len() {
        return Err(KilnError::Gradcheck(format!("{what}: {} values, the reference has {}", got.len(), want.len())));
    }
    let (err, at) = max_relative_error(got, want);
    if err > tol {
        return Err(KilnError::Gradcheck(format!("{what}: relative error {err:.3e} > {tol:.0e} at {at} (got {}, want {})", got[at], want[at])));
    }
    Ok(err)
}

/// What a passing check measured: the forward's worst relative error and each input's gradient's.
#[derive(Clone, Debug)]
pub struct GradcheckReport {
    pub forward_error: f64,
    pub gradient_errors: Vec<f64>,
}

/// Checks `gpu_op` against `cpu_op` on random inputs of the given shapes and domains (drawn from `rng`):
/// the forward values, then every input's gradient against central finite differences of `cpu_op`.
/// Returns the errors measured, or an error naming the first value out of tolerance.
pub fn gradcheck(
    name: &str,
    inputs: &[(&[usize], Domain)],
    rng: &mut Rng,
    tol: Tolerance,
    gpu_op: impl Fn(&[Tensor]) -> Result<Tensor>,
    cpu_op: impl Fn(&[CpuTensor]) -> CpuTensor,
) -> Result<GradcheckReport> {
    // The GPU sees f32-rounded values; the reference uses the same rounded values.
    let cpu_inputs: Vec<CpuTensor> = inputs
        .iter()
        .map(|(shape, d)| {
            let t = CpuTensor::new(random_values(crate::shape::numel(shape), *d, rng), shape);
            CpuTensor::from_f32(&t.to_f32(), &t.shape)
        })
        .collect();
    let vars: Vec<Tensor> = cpu_inputs.iter().map(|t| Tensor::from_slice(&t.to_f32(), &t.shape).map(|t| t.var())).collect::<Result<_>>()?;

    let y = gpu_op(&vars)?;
    let want = cpu_op(&cpu_inputs);
    if y.shape() != &want.shape[..] {
        return Err(KilnError::Gradcheck(format!("{name}: output shape {:?}, the reference's {:?}", y.shape(), want.shape)));
    }
    let forward_error = check_close(&format!("{name} forward"), &y.to_vec()?, &want.data, tol.forward)?;

    let r = CpuTensor::new(random_values(want.data.len(), Domain::Any, rng), &want.shape);
    let r = CpuTensor::from_f32(&r.to_f32(), &r.shape);
    let loss = y.mul(&Tensor::from_slice(&r.to_f32(), &r.shape)?)?.sum_all()?;
    let grads = loss.backward()?;
    let objective = |xs: &[CpuTensor]| -> f64 { cpu_op(xs).data.iter().zip(&r.data).map(|(a, b)| a * b).sum() };
    let at_inputs = objective(&cpu_inputs);

    let mut gradient_errors = Vec::with_capacity(vars.len());
    for (i, var) in vars.iter().enumerate() {
        let g = grads.get(var).ok_or_else(|| KilnError::Gradcheck(format!("{name}: no gradient for input {i}")))?.to_vec()?;
        let n = cpu_inputs[i].data.len();
        let picks: Vec<usize> = if n <= 256 { (0..n).collect() } else { (0..48).map(|_| rng.below(n)).collect() };
        let mut fd = Vec::with_capacity(picks.len());
        for &j in &picks {
            let mut xs = cpu_inputs.clone();
            xs[i].data[j] += tol.eps;
            let up = objective(&xs);
            xs[i].data[j] -= 2.0 * tol.eps;
            let down = objective(&xs);
            fd.push((up - down) / (2.0 * tol.eps));
        }
        let mut got: Vec<f32> = picks.iter().map(|&j| g[j]).collect();
        // A point whose objective has a kink within the step (some output of a relu, max or abs crossing its
        // switch) has no derivative to compare. Such a point is excused when it fails and its one-sided slopes
        // ten steps out differ by at least half the miss; a wrong rule at a smooth point is never excused.
        let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
        let mut excused = 0;
        for (k, &j) in picks.iter().enumerate() {
            let miss = (got[k] as f64 - fd[k]).abs();
            if miss / (fd[k].abs() + 0.01 * scale + 1e-6) <= tol.gradient {
                continue;
            }
            let h = 10.0 * tol.eps;
            let mut xs = cpu_inputs.clone();
            xs[i].data[j] += h;
            let right = (objective(&xs) - at_inputs) / h;
            xs[i].data[j] -= 2.0 * h;
            let left = (at_inputs - objective(&xs)) / h;
            if (right - left).abs() >= 0.5 * miss {
                got[k] = fd[k] as f32;
                excused += 1;
            }
        }
        // One point is always allowed: an input of two or three elements may have its one on a kink.
        if excused > (picks.len() / 4).max(1) {
            return Err(KilnError::Gradcheck(format!("{name} d/d(input {i}): {excused} of {} points sit on kinks; draw inputs away from them", picks.len())));
        }
        gradient_errors.push(check_close(&format!("{name} d/d(input {i}) vs finite differences"), &got, &fd, tol.gradient)?);
    }
    Ok(GradcheckReport { forward_error, gradient_errors })
}
