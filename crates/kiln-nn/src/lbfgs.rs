//! L-BFGS as PyTorch's `torch.optim.LBFGS` without a line search: the same defaults, stopping rules, first
//! step size, history and two-loop recursion, so the same problem gives the same iterates (checked against
//! torch in tests/tests/lbfgs.rs). It works on one flat vector on the host: a closure evaluates the loss and
//! its gradient at a point (uploading it, running forward and backward, reading the gradient back), which
//! suits problems of up to a few million values such as the pixels of style transfer.

use kiln_graph::{KilnError, Result};

/// L-BFGS's settings and state across [`Lbfgs::step`] calls (PyTorch's `param_groups[0]` and `state`).
#[derive(Clone, Debug)]
pub struct Lbfgs {
    pub lr: f32,
    /// Iterations per `step` call.
    pub max_iter: usize,
    /// Closure evaluations per `step` call (PyTorch: max_iter * 5 / 4).
    pub max_eval: usize,
    pub tolerance_grad: f32,
    pub tolerance_change: f32,
    pub history_size: usize,
    /// Iterations and closure evaluations so far, over every call.
    pub n_iter: usize,
    pub func_evals: usize,
    d: Vec<f32>,
    t: f32,
    old_dirs: Vec<Vec<f32>>,
    old_steps: Vec<Vec<f32>>,
    ro: Vec<f32>,
    h_diag: f32,
    prev_grad: Vec<f32>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() as f32
}

fn abs_max(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

impl Lbfgs {
    /// PyTorch's defaults: max_iter 20, max_eval 25, tolerance_grad 1e-7, tolerance_change 1e-9, history 100.
    pub fn new(lr: f32) -> Lbfgs {
        Lbfgs::with(lr, 20, 100)
    }

    /// `max_iter` iterations per call (max_eval = max_iter * 5 / 4, as PyTorch) and `history_size` pairs.
    pub fn with(lr: f32, max_iter: usize, history_size: usize) -> Lbfgs {
        Lbfgs {
            lr,
            max_iter,
            max_eval: max_iter * 5 / 4,
            tolerance_grad: 1e-7,
            tolerance_change: 1e-9,
            history_size,
            n_iter: 0,
            func_evals: 0,
            d: Vec::new(),
            t: 0.0,
            old_dirs: Vec::new(),
            old_steps: Vec::new(),
            ro: Vec::new(),
            h_diag: 1.0,
            prev_grad: Vec::new(),
        }
    }

    /// One call of PyTorch's `step(closure)`: up to `max_iter` iterations from `x`, updated in place.
    /// `closure(x)` returns the loss and its gradient at x. Returns the loss at the call's starting point.
    pub fn step(&mut self, x: &mut [f32], mut closure: impl FnMut(&[f32]) -> Result<(f32, Vec<f32>)>) -> Result<f32> {
        if self.lr.is_nan() || self.lr <= 0.0 || self.max_iter == 0 || self.history_size == 0 {
            return Err(KilnError::Usage(format!("L-BFGS: lr {} must be above 0, max_iter {} and history_size {} at least 1", self.lr, self.max_iter, self.history_size)));
        }
        let n = x.len();
        let check = |g: &Vec<f32>| -> Result<()> {
            if g.len() == n {
                Ok(())
            } else {
                Err(KilnError::Usage(format!("L-BFGS: the closure's gradient has {} values for {n} parameters", g.len())))
            }
        };
        let (orig_loss, mut grad) = closure(x)?;
        check(&grad)?;
        let mut loss = orig_loss;
        let mut current_evals = 1;
        self.func_evals += 1;
        if abs_max(&grad) <= self.tolerance_grad {
            return Ok(orig_loss);
        }
        let mut n_iter = 0;
        while n_iter < self.max_iter {
            n_iter += 1;
            self.n_iter += 1;
            if self.n_iter == 1 {
                self.d = grad.iter().map(|g| -g).collect();
                self.old_dirs.clear();
                self.old_steps.clear();
                self.ro.clear();
                self.h_diag = 1.0;
            } else {
                let y: Vec<f32> = grad.iter().zip(&self.prev_grad).map(|(g, p)| g - p).collect();
                let s: Vec<f32> = self.d.iter().map(|d| d * self.t).collect();
                let ys = dot(&y, &s);
                if ys > 1e-10 {
                    if self.old_dirs.len() == self.history_size {
                        self.old_dirs.remove(0);
                        self.old_steps.remove(0);
                        self.ro.remove(0);
                    }
                    self.h_diag = ys / dot(&y, &y);
                    self.old_dirs.push(y);
                    self.old_steps.push(s);
                    self.ro.push(1.0 / ys);
                }
                // The two-loop recursion: d = -H grad.
                let k = self.old_dirs.len();
                let mut al = vec![0f32; k];
                let mut q: Vec<f32> = grad.iter().map(|g| -g).collect();
                for i in (0..k).rev() {
                    al[i] = dot(&self.old_steps[i], &q) * self.ro[i];
                    for (qj, yj) in q.iter_mut().zip(&self.old_dirs[i]) {
                        *qj -= al[i] * yj;
                    }
                }
                for v in q.iter_mut() {
                    *v *= self.h_diag;
                }
                for (i, a) in al.iter().enumerate() {
                    let be = dot(&self.old_dirs[i], &q) * self.ro[i];
                    for (rj, sj) in q.iter_mut().zip(&self.old_steps[i]) {
                        *rj += (a - be) * sj;
                    }
                }
                self.d = q;
            }
            self.prev_grad = grad.clone();
            let prev_loss = loss;
            // The first step is scaled down by the gradient's size; later ones take lr.
            self.t = if self.n_iter == 1 { (1.0f32).min(1.0 / grad.iter().map(|g| g.abs()).sum::<f32>()) * self.lr } else { self.lr };
            let gtd = dot(&grad, &self.d);
            if gtd > -self.tolerance_change {
                break;
            }
            for (xi, di) in x.iter_mut().zip(&self.d) {
                *xi += self.t * di;
            }
            let mut small_grad = false;
            if n_iter != self.max_iter {
                let (l, g) = closure(x)?;
                check(&g)?;
                (loss, grad) = (l, g);
                small_grad = abs_max(&grad) <= self.tolerance_grad;
                current_evals += 1;
                self.func_evals += 1;
            }
            if n_iter == self.max_iter || current_evals >= self.max_eval || small_grad {
                break;
            }
            if abs_max(&self.d) * self.t.abs() <= self.tolerance_change || (loss - prev_loss).abs() < self.tolerance_change {
                break;
            }
        }
        Ok(orig_loss)
    }
}
