//! Optimizers over a VarStore's flat buffer. Gradients are copied into one flat gradient buffer (buffer copies,
//! no kernels; added there when micro-batches accumulate), optionally clipped, then one dispatch per run of
//! parameters updates them and their state: normally one run, more where parameter groups, parameters without
//! a gradient or the adapter's binding limit cut the flat buffer.
//!
//! PyTorch's rules: a parameter that got no gradient since the last update is left untouched (its moments and
//! weight decay included), and Adam's bias correction counts each parameter's own updates.

use kiln_graph::backend::BufView;
use kiln_graph::kernels::{optimizer_step, UpdateRule};
use kiln_graph::{no_grad, DType, Grads, KilnError, Result, Tensor};

use crate::checkpoint::{Checkpoint, CheckpointError, NamedTensor};
use crate::schedule::Schedule;
use crate::varstore::VarStore;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// Plain gradient descent (batch GD when the batch is the whole training set).
    Gd,
    Sgd {
        momentum: f32,
        nesterov: bool,
    },
    RmsProp {
        alpha: f32,
        eps: f32,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
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

/// A parameter group's own settings (PyTorch's `param_groups`): `None` keeps the optimizer's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupOptions {
    /// Base learning rate of the group (the schedule scales it as it scales the optimizer's).
    pub lr: Option<f32>,
    pub weight_decay: Option<f32>,
    /// Frozen: no gradient is computed for the group's parameters (`Param::set_requires_grad(false)`).
    pub frozen: bool,
}

/// How gradients are clipped before each update (PyTorch's `clip_grad_norm_` / `clip_grad_value_`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// Scales every gradient by min(1, max_norm / (||g||_2 + 1e-6)), the norm over all parameters at once.
    GlobalNorm(f32),
    /// Clamps every gradient element to [-v, v].
    Value(f32),
}

/// One trainable parameter as the optimizer sees it.
struct Slot {
    param: crate::varstore::Param,
    /// Declaration order in the VarStore (names are reported in it).
    decl: usize,
    /// Element offset in the flat buffer, and element count.
    offset: usize,
    len: usize,
    group: usize,
    /// Updates this parameter has had (Adam's bias correction counts these, as PyTorch's per-parameter step).
    steps: u64,
    /// Whether a gradient arrived since the last update.
    has_grad: bool,
}

pub struct Optimizer {
    pub kind: OptimizerKind,
    pub base_lr: f32,
    /// L2 penalty (added to the gradient) for GD/SGD/RMSprop/Adam; decoupled decay for AdamW.
    pub weight_decay: f32,
    pub schedule: Schedule,
    pub total_steps: u64,
    /// Gradient clipping before each update (none by default).
    pub clip: Option<Clip>,
    step: u64,
    grads: BufView,
    state1: BufView,
    state2: BufView,
    /// Trainable parameters by offset.
    slots: Vec<Slot>,
    /// Group 0 is the optimizer's own settings; `add_group` adds the others.
    groups: Vec<GroupOptions>,
    /// The global gradient norm of the last clipped update, on the GPU (read it only when needed).
    last_grad_norm: Option<Tensor>,
}

impl Optimizer {
    /// State buffers for `vs` (which must be finished), zeroed on the GPU.
    pub fn new(vs: &VarStore, kind: OptimizerKind, lr: f32, weight_decay: f32, schedule: Schedule, total_steps: u64) -> Result<Optimizer> {
        let g = vs.flat()?.device().clone();
        let bytes = 4 * vs.flat_len() as u64;
        let grads = g.alloc(bytes, "flat gradients")?;
        let state1 = g.alloc(bytes, "optimizer state")?;
        let state2 = g.alloc(bytes, "optimizer state")?;
        for b in [&grads, &state1, &state2] {
            g.zero(b)?;
        }
        let mut slots: Vec<Slot> =
            vs.layout().enumerate().map(|(decl, (p, offset))| Slot { param: p.clone(), decl, offset, len: p.shape().iter().product(), group: 0, steps: 0, has_grad: false }).collect();
        slots.sort_by_key(|s| s.offset);
        Ok(Optimizer { kind, base_lr: lr, weight_decay, schedule, total_steps, clip: None, step: 0, grads, state1, state2, slots, groups: vec![GroupOptions::default()], last_grad_norm: None })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Puts every parameter whose name passes `select` into a new group with its own settings (a parameter
    /// already in a group moves). Returns the names.
    pub fn add_group(&mut self, select: impl Fn(&str) -> bool, options: GroupOptions) -> Vec<String> {
        self.groups.push(options);
        let group = self.groups.len() - 1;
        let mut names = Vec::new();
        for s in self.slots.iter_mut().filter(|s| select(s.param.name())) {
            // Into a frozen group: no gradient from now on; out of one: trained again.
            if options.frozen || self.groups[s.group].frozen {
                s.param.set_requires_grad(!options.frozen);
            }
            s.group = group;
            names.push((s.decl, s.param.name().to_string()));
        }
        names.sort();
        names.into_iter().map(|(_, n)| n).collect()
    }

    /// Freezes every parameter whose name passes `select` (a frozen group): no gradient is computed for them
    /// and they stay bit-identical. Returns their names.
    pub fn freeze(&mut self, _vs: &VarStore, select: impl Fn(&str) -> bool) -> Vec<String> {
        self.add_group(select, GroupOptions { frozen: true, ..GroupOptions::default() })
    }

    /// The global L2 norm of the gradients of the last update clipped by norm (before clipping), as a GPU
    /// scalar: reading it waits for the GPU.
    pub fn last_grad_norm(&self) -> Option<&Tensor> {
        self.last_grad_norm.as_ref()
    }

    /// The optimizer's state (flat moment buffers, steps) as a checkpoint, for resuming.
    pub fn state_checkpoint(&self, vs: &VarStore) -> Result<Checkpoint> {
        let g = self.grads.device();
        let n = vs.flat_len();
        let read = |b: &BufView| -> Result<Vec<f32>> { Ok(bytemuck::pod_collect_to_vec(&g.read(&b.sub(0, 4 * n as u64))?)) };
        let tensors = vec![
            NamedTensor { name: "optimizer.state1".into(), shape: vec![n], data: read(&self.state1)? },
            NamedTensor { name: "optimizer.state2".into(), shape: vec![n], data: read(&self.state2)? },
        ];
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("optimizer.step".into(), self.step.to_string());
        metadata.insert("optimizer.kind".into(), format!("{:?}", self.kind));
        let steps: Vec<String> = self.slots.iter().map(|s| s.steps.to_string()).collect();
        metadata.insert("optimizer.param_steps".into(), steps.join(","));
        Ok(Checkpoint { tensors, metadata, ..Default::default() })
    }

    /// Restores what [`Optimizer::state_checkpoint`] saved.
    pub fn load_state(&mut self, file: &str, ck: &Checkpoint) -> std::result::Result<(), CheckpointError> {
        let g = self.state1.device().clone();
        for (name, buf) in [("optimizer.state1", &self.state1), ("optimizer.state2", &self.state2)] {
            let t =
                ck.get(name).ok_or_else(|| CheckpointError::Missing { file: file.into(), name: name.into(), available: ck.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>().join(", ") })?;
            if t.data.len() * 4 > buf.bytes as usize {
                return Err(CheckpointError::ShapeMismatch { file: file.into(), name: name.into(), found: t.shape.clone(), expected: vec![buf.bytes as usize / 4] });
            }
            g.write(buf, bytemuck::cast_slice(&t.data)).map_err(kiln_graph::KilnError::from)?;
        }
        let corrupt = |problem: String| CheckpointError::Corrupt { file: file.into(), problem };
        self.step = ck.metadata.get("optimizer.step").and_then(|s| s.parse().ok()).ok_or_else(|| corrupt("no optimizer.step in the metadata".into()))?;
        // Per-parameter steps; checkpoints from before they were kept had every parameter at the global step.
        let steps: Vec<u64> = match ck.metadata.get("optimizer.param_steps") {
            Some(list) => list.split(',').map(|v| v.parse().map_err(|_| corrupt(format!("optimizer.param_steps holds {v:?}, not a number")))).collect::<std::result::Result<_, _>>()?,
            None => vec![self.step; self.slots.len()],
        };
        if steps.len() != self.slots.len() {
            return Err(corrupt(format!("optimizer.param_steps has {} entries for {} parameters", steps.len(), self.slots.len())));
        }
        for (s, n) in self.slots.iter_mut().zip(steps) {
            s.steps = n;
        }
        Ok(())
    }

    /// The learning rate the next step will use (the optimizer's own; groups scale their base the same way).
    pub fn current_lr(&self) -> f32 {
        self.schedule.lr(self.base_lr, self.step, self.total_steps)
    }

    /// Adds `grads` to the gradients gathered since the last update (gradient accumulation over micro-batches;
    /// scale the loss by 1 / micro-batches for a mean). A gradient whose shape is not its parameter's is an
    /// error naming both.
    pub fn accumulate(&mut self, grads: &Grads) -> Result<()> {
        self.begin_accumulate()?;
        for i in 0..self.slots.len() {
            let t = self.slots[i].param.tensor()?;
            if let Some(gt) = grads.get(t) {
                self.accumulate_slot(i, gt)?;
            }
        }
        Ok(())
    }

    /// Before a step's gradients are gathered one by one ([`Optimizer::accumulate_param`]): clears the flat
    /// buffer when nothing is gathered yet, so parameters that get no gradient hold zeros.
    pub fn begin_accumulate(&mut self) -> Result<()> {
        if !self.slots.iter().any(|s| s.has_grad) {
            self.grads.device().zero(&self.grads)?;
        }
        Ok(())
    }

    /// Gathers the gradient `grad` of one parameter, the one whose tensor is `param` (what
    /// `Tensor::backward_with` hands over as soon as it is final). Returns its slot (the index
    /// [`Optimizer::gradient_slot`] takes), or `None` for a tensor that is none of this optimizer's parameters.
    /// Call [`Optimizer::begin_accumulate`] first.
    pub fn accumulate_param(&mut self, param: &Tensor, grad: &Tensor) -> Result<Option<usize>> {
        for i in 0..self.slots.len() {
            if self.slots[i].param.tensor()?.id() == param.id() {
                self.accumulate_slot(i, grad)?;
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// The elements of the flat gradient buffer that slot `i` fills: (offset, length).
    pub fn gradient_slot(&self, i: usize) -> (usize, usize) {
        (self.slots[i].offset, self.slots[i].len)
    }

    fn accumulate_slot(&mut self, i: usize, gt: &Tensor) -> Result<()> {
        let g = self.grads.device().clone();
        let s = &self.slots[i];
        if gt.shape() != s.param.shape() {
            return Err(KilnError::Shape {
                op: "Optimizer::accumulate",
                lhs: s.param.shape().to_vec(),
                rhs: gt.shape().to_vec(),
                detail: format!(": the gradient of {} has the wrong shape", s.param.name()),
            });
        }
        if s.has_grad {
            // Added in bindable pieces (a parameter may exceed the binding limit).
            for (p0, p1) in self.pieces(s.offset, s.offset + s.len) {
                let bytes = 4 * (p1 - p0) as u64;
                let dst = self.grads.sub(4 * p0 as u64, bytes);
                let part = gt.storage().sub(4 * (p0 - s.offset) as u64, bytes);
                let sum = no_grad(|| Tensor::from_storage(dst.clone(), &[p1 - p0], DType::F32)?.add(&Tensor::from_storage(part, &[p1 - p0], DType::F32)?))?;
                g.copy(sum.storage(), &dst, bytes)?;
            }
        } else {
            let bytes = 4 * s.len as u64;
            g.copy(gt.storage(), &self.grads.sub(4 * s.offset as u64, bytes), bytes)?;
        }
        self.slots[i].has_grad = true;
        Ok(())
    }

    /// One update from `grads`: [`accumulate`](Optimizer::accumulate) then [`apply`](Optimizer::apply).
    pub fn step(&mut self, vs: &VarStore, grads: &Grads) -> Result<()> {
        self.accumulate(grads)?;
        self.apply(vs)
    }

    /// Updates every parameter that got a gradient since the last update from the gathered gradients (clipped
    /// first if `clip` says so), and starts gathering anew. Parameters without one are left untouched.
    pub fn apply(&mut self, vs: &VarStore) -> Result<()> {
        if let (Some(clip), true) = (self.clip, self.slots.iter().any(|s| s.has_grad)) {
            self.clip_gradients(clip)?;
        }
        self.step += 1;
        let flat = vs.flat()?.clone();
        for (start, end, group, steps) in self.runs() {
            let opts = self.groups[group];
            let lr = self.schedule.lr(opts.lr.unwrap_or(self.base_lr), self.step - 1, self.total_steps);
            let rule = match self.kind {
                OptimizerKind::Gd => UpdateRule::Sgd { momentum: 0.0, nesterov: false },
                OptimizerKind::Sgd { momentum, nesterov } => UpdateRule::Sgd { momentum, nesterov },
                OptimizerKind::RmsProp { alpha, eps } => UpdateRule::RmsProp { alpha, eps },
                OptimizerKind::Adam { beta1, beta2, eps } => UpdateRule::Adam { beta1, beta2, eps, step: steps + 1, decoupled: false },
                OptimizerKind::AdamW { beta1, beta2, eps } => UpdateRule::Adam { beta1, beta2, eps, step: steps + 1, decoupled: true },
            };
            let weight_decay = opts.weight_decay.unwrap_or(self.weight_decay);
            for (p0, p1) in self.pieces(start, end) {
                let (off, bytes) = (4 * p0 as u64, 4 * (p1 - p0) as u64);
                let decay_end = vs.decay_end().clamp(p0, p1) - p0;
                optimizer_step(rule, &flat.sub(off, bytes), &self.grads.sub(off, bytes), &self.state1.sub(off, bytes), &self.state2.sub(off, bytes), p1 - p0, decay_end, lr, weight_decay)?;
            }
        }
        for s in &mut self.slots {
            if s.has_grad && !self.groups[s.group].frozen {
                s.steps += 1;
            }
            s.has_grad = false;
        }
        Ok(())
    }

    /// Runs [start, end) of the flat buffer (in elements) to update: consecutive parameters that got a
    /// gradient, in the same unfrozen group, with the same step count. Alignment padding between two
    /// parameters of a run is updated too (zero values, zero gradients: it stays zero).
    fn runs(&self) -> Vec<(usize, usize, usize, u64)> {
        let mut runs: Vec<(usize, usize, usize, u64)> = Vec::new();
        let mut open: Option<(usize, usize, usize, u64)> = None;
        for s in &self.slots {
            if !s.has_grad || self.groups[s.group].frozen {
                runs.extend(open.take());
                continue;
            }
            open = match open {
                Some((start, _, group, steps)) if group == s.group && steps == s.steps => Some((start, s.offset + s.len, group, steps)),
                other => {
                    runs.extend(other);
                    Some((s.offset, s.offset + s.len, s.group, s.steps))
                }
            };
        }
        runs.extend(open);
        runs
    }

    /// [start, end) cut into pieces a kernel can bind: at most the device's binding limit each, every piece
    /// starting at an aligned offset (runs start at parameter offsets, which are aligned).
    fn pieces(&self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let dev = self.grads.device();
        let align = (dev.limits.min_storage_buffer_offset_alignment as usize / 4).max(4);
        let most = ((dev.max_binding_bytes() as usize / 4) / align * align).max(align);
        (start..end).step_by(most).map(|p0| (p0, (p0 + most).min(end))).collect()
    }

    /// The flat gradient buffer the updates read (gathered by [`accumulate`](Optimizer::accumulate)), and the
    /// elements of it in use: what a data-parallel all-reduce averages between replicas (`crate::parallel`).
    pub fn gradient_buffer(&self) -> (&BufView, usize) {
        (&self.grads, self.slots.iter().map(|s| s.offset + s.len).max().unwrap_or(0))
    }

    /// Which parameters got a gradient since the last update, in the flat buffer's order.
    pub(crate) fn gradient_flags(&self) -> Vec<bool> {
        self.slots.iter().map(|s| s.has_grad).collect()
    }

    /// Marks the parameters whose gradients an all-reduce wrote (a replica that saw no sample this step
    /// updates exactly as the others do).
    pub(crate) fn set_gradient_flags(&mut self, flags: &[bool]) {
        for (s, &f) in self.slots.iter_mut().zip(flags) {
            s.has_grad = f;
        }
    }

    /// Clips the gathered gradients on the GPU, piece by piece (no host round trip).
    fn clip_gradients(&mut self, clip: Clip) -> Result<()> {
        let g = self.grads.device().clone();
        let n = self.slots.iter().map(|s| s.offset + s.len).max().unwrap_or(0);
        let pieces = self.pieces(0, n);
        let piece = |p0: usize, p1: usize| -> Result<Tensor> { Tensor::from_storage(self.grads.sub(4 * p0 as u64, 4 * (p1 - p0) as u64), &[p1 - p0], DType::F32) };
        no_grad(|| -> Result<()> {
            let scale = match clip {
                Clip::Value(v) => {
                    for &(p0, p1) in &pieces {
                        let clipped = piece(p0, p1)?.clamp(-v, v)?;
                        g.copy(clipped.storage(), &self.grads.sub(4 * p0 as u64, 4 * (p1 - p0) as u64), 4 * (p1 - p0) as u64)?;
                    }
                    return Ok(());
                }
                Clip::GlobalNorm(max_norm) => {
                    let mut sum: Option<Tensor> = None;
                    for &(p0, p1) in &pieces {
                        let t = piece(p0, p1)?;
                        let sq = t.mul(&t)?.sum_all()?;
                        sum = Some(match sum {
                            Some(s) => s.add(&sq)?,
                            None => sq,
                        });
                    }
                    let Some(sum) = sum else { return Ok(()) };
                    let norm = sum.sqrt()?;
                    let coef = norm.add_scalar(1e-6)?.powf(-1.0)?.scale(max_norm)?.clamp(0.0, 1.0)?;
                    self.last_grad_norm = Some(norm);
                    coef
                }
            };
            for &(p0, p1) in &pieces {
                let scaled = piece(p0, p1)?.broadcast_mul(&scale)?;
                g.copy(scaled.storage(), &self.grads.sub(4 * p0 as u64, 4 * (p1 - p0) as u64), 4 * (p1 - p0) as u64)?;
            }
            Ok(())
        })
    }
}
