//! Optimizers over a VarStore's flat buffer. Gradients are copied into one flat gradient buffer (buffer copies,
//! no kernels), then a single dispatch updates every parameter and its state.

use kiln_graph::backend::{gpu, BufView};
use kiln_graph::kernels::{optimizer_step, UpdateRule};
use kiln_graph::{Grads, Result};

use crate::checkpoint::{Checkpoint, CheckpointError, NamedTensor};
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
    /// Names of parameters that are not updated (transfer learning).
    frozen: Vec<String>,
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
        Ok(Optimizer { kind, base_lr: lr, weight_decay, schedule, total_steps, step: 0, grads, state1, state2, frozen: Vec::new() })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Stops updating every parameter whose name passes `select`; they stay bit-identical. Returns their names.
    pub fn freeze(&mut self, vs: &VarStore, select: impl Fn(&str) -> bool) -> Vec<String> {
        self.frozen = vs.layout().map(|(p, _)| p.name().to_string()).filter(|n| select(n)).collect();
        self.frozen.clone()
    }

    /// The optimizer's state (flat moment buffers, step) as a checkpoint, for resuming.
    pub fn state_checkpoint(&self, vs: &VarStore) -> Result<Checkpoint> {
        let g = gpu()?;
        let n = vs.flat_len();
        let read = |b: &BufView| -> Result<Vec<f32>> { Ok(bytemuck::pod_collect_to_vec(&g.read(&b.sub(0, 4 * n as u64))?)) };
        let tensors = vec![
            NamedTensor { name: "optimizer.state1".into(), shape: vec![n], data: read(&self.state1)? },
            NamedTensor { name: "optimizer.state2".into(), shape: vec![n], data: read(&self.state2)? },
        ];
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("optimizer.step".into(), self.step.to_string());
        metadata.insert("optimizer.kind".into(), format!("{:?}", self.kind));
        Ok(Checkpoint { tensors, metadata })
    }

    /// Restores what [`Optimizer::state_checkpoint`] saved.
    pub fn load_state(&mut self, file: &str, ck: &Checkpoint) -> std::result::Result<(), CheckpointError> {
        let g = gpu().map_err(kiln_graph::KilnError::from)?;
        for (name, buf) in [("optimizer.state1", &self.state1), ("optimizer.state2", &self.state2)] {
            let t = ck.get(name).ok_or_else(|| CheckpointError::Missing { file: file.into(), name: name.into(), available: ck.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>().join(", ") })?;
            if t.data.len() * 4 > buf.bytes as usize {
                return Err(CheckpointError::ShapeMismatch { file: file.into(), name: name.into(), found: t.shape.clone(), expected: vec![buf.bytes as usize / 4] });
            }
            g.write(buf, bytemuck::cast_slice(&t.data)).map_err(kiln_graph::KilnError::from)?;
        }
        self.step = ck.metadata.get("optimizer.step").and_then(|s| s.parse().ok()).ok_or_else(|| CheckpointError::Corrupt { file: file.into(), problem: "no optimizer.step in the metadata".into() })?;
        Ok(())
    }
    /// The learning rate the next step will use.
    pub fn current_lr(&self) -> f32 {
        self.schedule.lr(self.base_lr, self.step, self.total_steps)
    }

    /// One update of every trainable parameter from `grads` (parameters without a gradient get zero). Without
    /// frozen parameters this is one dispatch; frozen ones split the flat buffer into runs, one dispatch each.
    pub fn step(&mut self, vs: &VarStore, grads: &Grads) -> Result<()> {
        let g = gpu()?;
        g.zero(&self.grads)?;
        let mut layout: Vec<(&crate::varstore::Param, usize)> = vs.layout().collect();
        layout.sort_by_key(|&(_, offset)| offset);
        // Runs [start, end) of consecutive trainable parameters, in elements of the flat buffer.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut open: Option<(usize, usize)> = None;
        for (param, offset) in layout {
            let end = offset + param.shape().iter().product::<usize>();
            if self.frozen.iter().any(|f| f == param.name()) {
                runs.extend(open.take());
                continue;
            }
            if let Some(gt) = grads.get(param.tensor()?) {
                let bytes = 4 * gt.numel() as u64;
                g.copy(gt.storage(), &self.grads.sub(4 * offset as u64, bytes), bytes)?;
            }
            open = Some(match open {
                Some((s, _)) => (s, end),
                None => (offset, end),
            });
        }
        runs.extend(open);
        let lr = self.current_lr();
        self.step += 1;
        let rule = match self.kind {
            OptimizerKind::Gd => UpdateRule::Sgd { momentum: 0.0, nesterov: false },
            OptimizerKind::Sgd { momentum, nesterov } => UpdateRule::Sgd { momentum, nesterov },
            OptimizerKind::RmsProp { alpha, eps } => UpdateRule::RmsProp { alpha, eps },
            OptimizerKind::Adam { beta1, beta2, eps } => UpdateRule::Adam { beta1, beta2, eps, step: self.step, decoupled: false },
            OptimizerKind::AdamW { beta1, beta2, eps } => UpdateRule::Adam { beta1, beta2, eps, step: self.step, decoupled: true },
        };
        let flat = vs.flat()?;
        for (start, end) in runs {
            let (off, bytes) = (4 * start as u64, 4 * (end - start) as u64);
            let decay_end = vs.decay_end().clamp(start, end) - start;
            optimizer_step(rule, &flat.sub(off, bytes), &self.grads.sub(off, bytes), &self.state1.sub(off, bytes), &self.state2.sub(off, bytes), end - start, decay_end, lr, self.weight_decay)?;
        }
        Ok(())
    }
}
