//! Optimizers over a VarStore's flat buffer. Gradients are copied into one flat gradient buffer (buffer copies,
//! no kernels), then a single dispatch updates every parameter and its state.

use kiln_graph::backend::{gpu, BufView};
use kiln_graph::kernels::{optimizer_step, UpdateRule};
use kiln_graph::{Grads, Result};

use crate::schedule::Schedule;
use crate::varstore::VarStore;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// Plain gradient descent (batch GD when the batch is the whole training set).
    Gd,
    Sgd { momentum: f32, nesterov: bool },
    RmsProp { alpha: f32, eps: f32 },
    Adam { beta1: f32, beta2: f32, eps: f32 },
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<OptimizerKind, String> {
        Ok(match s {
            "gd" => OptimizerKind::Gd,
            "sgd" | "momentum" => OptimizerKind::Sgd { momentum: 0.9, nesterov: false },
            "nesterov" => OptimizerKind::Sgd { momentum: 0.9, nesterov: true },
            "rmsprop" => OptimizerKind::RmsProp { alpha: 0.99, eps: 1e-8 },
            "adam" => OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            "adamw" => OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            _ => return Err(format!("unknown optimizer {s:?} (gd, sgd, nesterov, rmsprop, adam, adamw)")),
        })
    }
}

pub struct Optimizer {
    pub kind: OptimizerKind,
    pub base_lr: f32,
    /// L2 penalty (added to the gradient) for GD/SGD/RMSprop/Adam; decoupled decay for AdamW.
    pub weight_decay: f32,
    pub schedule: Schedule,
    pub total_steps: u64,
    step: u64,
    grads: BufView,
    state1: BufView,
    state2: BufView,
}

impl Optimizer {
    /// State buffers for `vs` (which must be finished), zeroed on the GPU.
    pub fn new(vs: &VarStore, kind: OptimizerKind, lr: f32, weight_decay: f32, schedule: Schedule, total_steps: u64) -> Result<Optimizer> {
        let g = gpu()?;
        let bytes = 4 * vs.flat_len() as u64;
        let grads = g.alloc(bytes, "flat gradients")?;
        let state1 = g.alloc(bytes, "optimizer state")?;
        let state2 = g.alloc(bytes, "optimizer state")?;
        for b in [&grads, &state1, &state2] {
            g.zero(b)?;
        }
        let _ = vs.flat()?;
        Ok(Optimizer { kind, base_lr: lr, weight_decay, schedule, total_steps, step: 0, grads, state1, state2 })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }
    /// The learning rate the next step will use.
    pub fn current_lr(&self) -> f32 {
        self.schedule.lr(self.base_lr, self.step, self.total_steps)
    }

    /// One update of every parameter from `grads` (parameters without a gradient get zero).
    pub fn step(&mut self, vs: &VarStore, grads: &Grads) -> Result<()> {
        let g = gpu()?;
        g.zero(&self.grads)?;
        for (param, offset) in vs.layout() {
            if let Some(gt) = grads.get(param.tensor()?) {
                let bytes = 4 * gt.numel() as u64;
                g.copy(gt.storage(), &self.grads.sub(4 * offset as u64, bytes), bytes)?;
            }
        }
        let lr = self.current_lr();
        self.step += 1;
        let rule = match self.kind {
            OptimizerKind::Gd => UpdateRule::Sgd { momentum: 0.0, nesterov: false },
            OptimizerKind::Sgd { momentum, nesterov } => UpdateRule::Sgd { momentum, nesterov },
            OptimizerKind::RmsProp { alpha, eps } => UpdateRule::RmsProp { alpha, eps },
            OptimizerKind::Adam { beta1, beta2, eps } => UpdateRule::Adam { beta1, beta2, eps, step: self.step, decoupled: false },
            OptimizerKind::AdamW { beta1, beta2, eps } => UpdateRule::Adam { beta1, beta2, eps, step: self.step, decoupled: true },
        };
        let n = vs.flat_len();
        optimizer_step(rule, vs.flat()?, &self.grads, &self.state1, &self.state2, n, vs.decay_end(), lr, self.weight_decay)
    }
}
