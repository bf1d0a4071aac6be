//! Named parameters in one flat GPU buffer (llm.c style): each parameter is a view at an aligned offset, the
//! gradients and optimizer state use the same layout, so one dispatch updates every parameter. Parameters that
//! take weight decay are laid out first; the update kernel decays elements below `decay_end` only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use kiln_graph::backend::{BufView, Device};
use kiln_graph::{DType, KilnError, Result, Rng, Tensor};

use crate::init::Init;

struct Slot {
    name: String,
    shape: Vec<usize>,
    /// The trainable leaf, and the same storage as a plain tensor: which one `tensor()` hands out is what
    /// `requires_grad` switches, so a frozen parameter takes no part in backward at all.
    tensor: OnceLock<(Tensor, Tensor)>,
    requires_grad: AtomicBool,
}

/// A parameter copied to the host: its name, shape and values.
pub type HostParam = (String, Vec<usize>, Vec<f32>);

/// A handle to one named parameter. Its tensor exists once the store is finished.
#[derive(Clone)]
pub struct Param(Arc<Slot>);

impl Param {
    pub fn name(&self) -> &str {
        &self.0.name
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    /// The parameter's tensor: a trainable leaf, or (frozen) a tensor without gradient over the same storage.
    pub fn tensor(&self) -> Result<&Tensor> {
        let (leaf, plain) = self.0.tensor.get().ok_or_else(|| KilnError::Usage(format!("parameter {} used before VarStore::finish()", self.0.name)))?;
        Ok(if self.requires_grad() { leaf } else { plain })
    }
    /// Whether backward computes this parameter's gradient (PyTorch's `requires_grad`; buffers: false).
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad.load(Ordering::Relaxed)
    }
    /// Freezes (false) or unfreezes (true) the parameter: a frozen one gets no gradient computed, so no
    /// optimizer moves it. Takes effect from the next forward pass.
    pub fn set_requires_grad(&self, on: bool) {
        self.0.requires_grad.store(on, Ordering::Relaxed);
    }
}

struct Entry {
    param: Param,
    init: Vec<f32>,
    decay: bool,
    /// A buffer (running statistics): saved and loaded with the parameters, never trained.
    buffer: bool,
    /// Offset in elements within the flat buffer, set by `finish`.
    offset: usize,
}

/// Builds and owns a model's parameters.
pub struct VarStore {
    entries: Vec<Entry>,
    /// False for a shapes-only store (summaries of models too big to initialise for nothing).
    materialize: bool,
    rng: Rng,
    flat: Option<BufView>,
    len: usize,
    decay_end: usize,
    /// Where `finish` puts the parameters (None: the default device).
    device: Option<Device>,
    /// Int64 counters saved beside the parameters (batch norm's `num_batches_tracked`).
    counters: Vec<(String, std::sync::Arc<std::sync::atomic::AtomicI64>)>,
}

impl VarStore {
    /// A store whose parameters will live on the thread's current device (`Device::current`) when finished.
    pub fn new(seed: u64) -> VarStore {
        VarStore { entries: Vec::new(), materialize: true, rng: Rng::new(seed), flat: None, len: 0, decay_end: 0, device: None, counters: Vec::new() }
    }

    /// A store whose parameters will live on `device`.
    pub fn on(device: &Device, seed: u64) -> VarStore {
        VarStore { device: Some(device.clone()), ..VarStore::new(seed) }
    }

    /// The device the parameters live on (for a store made with `new`: the thread's current device, fixed at `finish`).
    pub fn device(&self) -> Result<Device> {
        match &self.device {
            Some(d) => Ok(d.clone()),
            None => Ok(Device::current()?),
        }
    }

    /// A store that records names and shapes only: enough to count parameters and infer shapes; `finish`
    /// refuses it.
    pub fn shapes_only() -> VarStore {
        VarStore { materialize: false, ..VarStore::new(0) }
    }

    /// Declares a parameter. `decay`: whether weight decay / L2 applies (weights yes, biases no).
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init, decay: bool) -> Result<Param> {
        if self.flat.is_some() {
            return Err(KilnError::Usage(format!("parameter {name} declared after VarStore::finish()")));
        }
        if self.entries.iter().any(|e| e.param.name() == name) {
            return Err(KilnError::Usage(format!("parameter {name} declared twice")));
        }
        let values = if self.materialize { init.values(shape, &mut self.rng) } else { Vec::new() };
        let param = Param(Arc::new(Slot { name: name.to_string(), shape: shape.to_vec(), tensor: OnceLock::new(), requires_grad: AtomicBool::new(true) }));
        self.entries.push(Entry { param: param.clone(), init: values, decay, buffer: false, offset: 0 });
        Ok(param)
    }

    /// Changes a declared parameter's initial values before `finish` (an embedding's zero padding row).
    pub fn edit_initial(&mut self, param: &Param, edit: impl FnOnce(&mut [f32])) -> Result<()> {
        if self.flat.is_some() {
            return Err(KilnError::Usage(format!("parameter {}: initial values edited after VarStore::finish()", param.name())));
        }
        if let Some(e) = self.entries.iter_mut().find(|e| e.param.name() == param.name()) {
            edit(&mut e.init);
        }
        Ok(())
    }

    /// Declares a non-trainable buffer (batch norm's running statistics): named and checkpointed like a
    /// parameter, kept out of the flat parameter buffer so no optimizer touches it.
    pub fn buffer(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        let p = self.param(name, shape, init, false)?;
        if let Some(e) = self.entries.last_mut() {
            e.buffer = true;
            e.param.set_requires_grad(false);
        }
        Ok(p)
    }

    /// Lays out every parameter in one buffer (decayed ones first, offsets aligned for binding) and uploads it.
    pub fn finish(&mut self) -> Result<()> {
        if self.flat.is_some() {
            return Ok(());
        }
        if !self.materialize {
            return Err(KilnError::Usage("a shapes-only VarStore cannot be finished (it holds no values)".into()));
        }
        let g = self.device()?;
        self.device = Some(g.clone());
        let align = (g.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        let mut order: Vec<usize> = (0..self.entries.len()).filter(|&i| !self.entries[i].buffer).collect();
        order.sort_by_key(|&i| !self.entries[i].decay); // stable: declaration order within each group
        let mut at = 0;
        for &i in &order {
            if !self.entries[i].decay && self.decay_end == 0 {
                self.decay_end = at;
            }
            self.entries[i].offset = at;
            at = (at + self.entries[i].init.len()).div_ceil(align) * align;
        }
        if self.entries.iter().filter(|e| !e.buffer).all(|e| e.decay) {
            self.decay_end = at;
        }
        self.len = at.max(1);
        let mut host = vec![0f32; self.len];
        // Buffers live outside the flat buffer (their offset means nothing).
        for e in self.entries.iter().filter(|e| !e.buffer) {
            host[e.offset..e.offset + e.init.len()].copy_from_slice(&e.init);
        }
        let flat = g.upload(bytemuck::cast_slice(&host), "parameters")?;
        for e in &mut self.entries {
            let t = if e.buffer {
                Tensor::from_slice_on(&g, &e.init, e.param.shape())?
            } else {
                let view = flat.sub(4 * e.offset as u64, 4 * e.init.len().max(1) as u64);
                Tensor::from_storage(view, e.param.shape(), DType::F32)?
            };
            let _ = e.param.0.tensor.set((t.var(), t));
            e.init = Vec::new();
        }
        self.flat = Some(flat);
        Ok(())
    }

    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.entries.iter().map(|e| &e.param)
    }

    /// (param, element offset) pairs of the trainable parameters, for the optimizer.
    pub(crate) fn layout(&self) -> impl Iterator<Item = (&Param, usize)> {
        self.entries.iter().filter(|e| !e.buffer).map(|e| (&e.param, e.offset))
    }

    /// Freezes every trainable parameter whose name passes `select` (see [`Param::set_requires_grad`]) and
    /// returns their names.
    pub fn freeze(&self, select: impl Fn(&str) -> bool) -> Vec<String> {
        self.layout()
            .map(|(p, _)| p)
            .filter(|p| select(p.name()))
            .map(|p| {
                p.set_requires_grad(false);
                p.name().to_string()
            })
            .collect()
    }

    /// Whether `name` is a buffer rather than a trainable parameter.
    pub fn is_buffer(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.buffer && e.param.name() == name)
    }

    pub fn flat(&self) -> Result<&BufView> {
        self.flat.as_ref().ok_or_else(|| KilnError::Usage("VarStore::finish() not called".into()))
    }
    /// Elements in the flat buffer, alignment padding included.
    pub fn flat_len(&self) -> usize {
        self.len
    }
    pub fn decay_end(&self) -> usize {
        self.decay_end
    }
    /// Number of trainable values (padding and buffers excluded).
    pub fn num_values(&self) -> usize {
        self.entries.iter().filter(|e| !e.buffer).map(|e| e.param.shape().iter().product::<usize>()).sum()
    }

    /// Parameters and buffers as a checkpoint, under their PyTorch-style names.
    pub fn to_checkpoint(&self) -> Result<crate::checkpoint::Checkpoint> {
        let tensors = self.to_host()?.into_iter().map(|(name, shape, data)| crate::checkpoint::NamedTensor { name, shape, data }).collect();
        let int64 = self.counters.iter().map(|(name, c)| crate::checkpoint::NamedInts { name: name.clone(), shape: vec![], data: vec![c.load(std::sync::atomic::Ordering::Relaxed)] }).collect();
        Ok(crate::checkpoint::Checkpoint { tensors, int64, metadata: Default::default() })
    }

    /// An int64 counter saved with the parameters under `name` (a scalar, as PyTorch's buffers of that kind).
    pub fn counter(&mut self, name: &str) -> std::sync::Arc<std::sync::atomic::AtomicI64> {
        let c = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        self.counters.push((name.to_string(), c.clone()));
        c
    }

    /// The counters' names, in declaration order.
    pub fn counter_names(&self) -> impl Iterator<Item = &str> {
        self.counters.iter().map(|(n, _)| n.as_str())
    }

    /// Copies values from a checkpoint into the parameters and buffers whose names pass `select`. With `strict`,
    /// every selected name must be present; otherwise missing ones keep their values. Shapes must match.
    /// Returns the names loaded.
    pub fn load_checkpoint(&self, file: &str, ck: &crate::checkpoint::Checkpoint, strict: bool, select: impl Fn(&str) -> bool) -> std::result::Result<Vec<String>, crate::checkpoint::CheckpointError> {
        use crate::checkpoint::CheckpointError;
        let g = self.device()?;
        let mut loaded = Vec::new();
        for p in self.params().filter(|p| select(p.name())) {
            let Some(t) = ck.get(p.name()) else {
                if strict {
                    let available = ck.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
                    return Err(CheckpointError::Missing { file: file.into(), name: p.name().into(), available });
                }
                continue;
            };
            if t.shape != p.shape() {
                return Err(CheckpointError::ShapeMismatch { file: file.into(), name: p.name().into(), found: t.shape.clone(), expected: p.shape().to_vec() });
            }
            g.write(&p.tensor()?.storage().sub(0, 4 * t.data.len().max(1) as u64), bytemuck::cast_slice(&t.data)).map_err(KilnError::from)?;
            loaded.push(p.name().to_string());
        }
        // Counters load when present (checkpoints from before they were saved have none).
        for (name, c) in self.counters.iter().filter(|(n, _)| select(n)) {
            if let Some(t) = ck.int64.iter().find(|t| &t.name == name) {
                c.store(t.data.first().copied().unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
                loaded.push(name.clone());
            }
        }
        Ok(loaded)
    }

    /// Every parameter's values by name (for checks and checkpoints).
    pub fn to_host(&self) -> Result<Vec<HostParam>> {
        self.params().map(|p| Ok((p.name().to_string(), p.shape().to_vec(), p.tensor()?.to_vec()?))).collect()
    }
}
