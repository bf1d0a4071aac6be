//! Convolutional-network layers: Conv2d, pooling, Flatten, BatchNorm, Dropout.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kiln_graph::kernels::BiasAct;
use kiln_graph::{no_grad, Conv2dGeom, KilnError, Pool2dGeom, Result, Tensor};

use crate::init::Init;
use crate::module::{shape_error, Layer, Module};
use crate::varstore::{Param, VarStore};

/// How a convolution pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// No padding.
    Valid,
    /// Output size = ceil(input / stride): (k - 1) * dilation / 2 on each side (odd kernels).
    Same,
    /// Explicit rows and columns on each side.
    Explicit(usize, usize),
}

/// Conv2d settings beyond channels and kernel size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2dConfig {
    pub stride: usize,
    pub padding: Padding,
    pub dilation: usize,
    pub groups: usize,
    pub bias: bool,
    pub init: Init,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Conv2dConfig { stride: 1, padding: Padding::Valid, dilation: 1, groups: 1, bias: true, init: Init::HeNormal }
    }
}

/// 2-D convolution with PyTorch's parameter layout: `{name}.weight` [out, in/groups, kh, kw], `{name}.bias` [out].
pub struct Conv2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub geom: Conv2dGeom,
}

impl Conv2d {
    pub fn new(vs: &mut VarStore, name: &str, in_ch: usize, out_ch: usize, kernel: usize, cfg: Conv2dConfig) -> Result<Conv2d> {
        if cfg.groups == 0 || !in_ch.is_multiple_of(cfg.groups) || !out_ch.is_multiple_of(cfg.groups) || kernel == 0 || cfg.stride == 0 || cfg.dilation == 0 {
            return Err(KilnError::Invalid { op: "Conv2d", shape: vec![out_ch, in_ch, kernel, kernel], message: format!("invalid configuration {cfg:?}") });
        }
        let pad = match cfg.padding {
            Padding::Valid => (0, 0),
            Padding::Same => {
                if kernel.is_multiple_of(2) {
                    return Err(KilnError::Invalid { op: "Conv2d", shape: vec![out_ch, in_ch, kernel, kernel], message: "\"same\" padding needs an odd kernel".into() });
                }
                let p = (kernel - 1) * cfg.dilation / 2;
                (p, p)
            }
            Padding::Explicit(h, w) => (h, w),
        };
        let weight = vs.param(&format!("{name}.weight"), &[out_ch, in_ch / cfg.groups, kernel, kernel], cfg.init, true)?;
        let bias = if cfg.bias { Some(vs.param(&format!("{name}.bias"), &[out_ch], Init::Zeros, false)?) } else { None };
        let geom = Conv2dGeom { stride: [cfg.stride; 2], padding: [pad.0, pad.1], dilation: [cfg.dilation; 2], groups: cfg.groups };
        Ok(Conv2d { weight, bias, geom })
    }
}

/// y + bias per channel: y [n, c, h, w], bias [c].
pub fn add_channel_bias(y: Tensor, bias: Option<&Param>) -> Result<Tensor> {
    match bias {
        Some(b) => y.bias_act(b.tensor()?, 1, kiln_graph::kernels::BiasAct::Identity),
        None => Ok(y),
    }
}

impl Module for Conv2d {
    fn describe(&self) -> String {
        let w = self.weight.shape();
        let g = &self.geom;
        let mut d = format!("Conv2d({}, {}, k={}x{}", w[1] * g.groups, w[0], w[2], w[3]);
        if g.stride != [1, 1] {
            d += &format!(", s={}", g.stride[0]);
        }
        if g.padding != [0, 0] {
            d += &format!(", p={}", g.padding[0]);
        }
        if g.groups != 1 {
            d += &format!(", groups={}", g.groups);
        }
        if self.bias.is_none() {
            d += ", no bias";
        }
        d + ")"
    }
    fn own_params(&self) -> Vec<&Param> {
        std::iter::once(&self.weight).chain(self.bias.as_ref()).collect()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Conv2d {
    /// x: [n, in, h, w] -> [n, out, oh, ow]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        add_channel_bias(x.conv2d(self.weight.tensor()?, self.geom)?, self.bias.as_ref())
    }
    fn forward_before_bias(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor, usize)>> {
        let Some(b) = &self.bias else { return Ok(None) };
        Ok(Some((x.conv2d(self.weight.tensor()?, self.geom)?, b.tensor()?.clone(), 1)))
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let w = self.weight.shape();
        if input.len() != 4 || input[1] != w[1] * self.geom.groups {
            return Err(shape_error(&self.describe(), input, "expects [n, in_channels, h, w]"));
        }
        let (oh, ow) = self.geom.output_size(input[2], input[3], w[2], w[3]).ok_or_else(|| shape_error(&self.describe(), input, "kernel larger than the padded input"))?;
        Ok(vec![input[0], w[0], oh, ow])
    }
}

/// PyTorch's `nn.ConvTranspose2d`: `{name}.weight` [in, out / groups, kh, kw], `{name}.bias` [out], both
/// U(-b, b) with b = 1 / sqrt(out / groups * kh * kw) as PyTorch initialises them (kaiming_uniform with
/// a = sqrt(5) over the weight's fan-in, which for this layout is out / groups * kh * kw).
pub struct ConvTranspose2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub geom: Conv2dGeom,
    pub output_padding: [usize; 2],
}

impl ConvTranspose2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(vs: &mut VarStore, name: &str, in_ch: usize, out_ch: usize, kernel: usize, stride: usize, padding: usize, output_padding: usize, groups: usize, bias: bool) -> Result<ConvTranspose2d> {
        if groups == 0 || !in_ch.is_multiple_of(groups) || !out_ch.is_multiple_of(groups) || kernel == 0 || stride == 0 || output_padding >= stride {
            return Err(KilnError::Invalid {
                op: "ConvTranspose2d",
                shape: vec![in_ch, out_ch, kernel, kernel],
                message: format!("invalid configuration: stride {stride}, output_padding {output_padding} (must be under the stride), groups {groups}"),
            });
        }
        let bound = 1.0 / ((out_ch / groups * kernel * kernel) as f32).sqrt();
        let init = Init::Uniform { lo: -bound, hi: bound };
        Ok(ConvTranspose2d {
            weight: vs.param(&format!("{name}.weight"), &[in_ch, out_ch / groups, kernel, kernel], init, true)?,
            bias: if bias { Some(vs.param(&format!("{name}.bias"), &[out_ch], init, false)?) } else { None },
            geom: Conv2dGeom { stride: [stride; 2], padding: [padding; 2], dilation: [1, 1], groups },
            output_padding: [output_padding; 2],
        })
    }
}

impl Module for ConvTranspose2d {
    fn describe(&self) -> String {
        let w = self.weight.shape();
        format!("ConvTranspose2d({}, {}, k={}x{}, s={}, p={}, output_padding={})", w[0], w[1] * self.geom.groups, w[2], w[3], self.geom.stride[0], self.geom.padding[0], self.output_padding[0])
    }
    fn own_params(&self) -> Vec<&Param> {
        std::iter::once(&self.weight).chain(self.bias.as_ref()).collect()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for ConvTranspose2d {
    /// x: [n, in, h, w] -> [n, out, (h - 1) s - 2 p + k + output_padding, ...]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        add_channel_bias(x.conv_transpose2d(self.weight.tensor()?, self.geom, self.output_padding)?, self.bias.as_ref())
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let w = self.weight.shape();
        if input.len() != 4 || input[1] != w[0] {
            return Err(shape_error(&self.describe(), input, "expects [n, in_channels, h, w]"));
        }
        let size = |i: usize, k: usize, d: usize| ((i.max(1) - 1) * self.geom.stride[d] + k + self.output_padding[d]).checked_sub(2 * self.geom.padding[d]).filter(|&v| v > 0);
        match (size(input[2], w[2], 0), size(input[3], w[3], 1)) {
            (Some(oh), Some(ow)) => Ok(vec![input[0], w[1] * self.geom.groups, oh, ow]),
            _ => Err(shape_error(&self.describe(), input, "the output would be empty")),
        }
    }
}

fn pool_shape(layer: &dyn Module, g: &Pool2dGeom, input: &[usize]) -> Result<Vec<usize>> {
    if input.len() != 4 {
        return Err(shape_error(&layer.describe(), input, "expects [n, c, h, w]"));
    }
    let (oh, ow) = g.output_size(input[2], input[3]).ok_or_else(|| shape_error(&layer.describe(), input, "window does not fit"))?;
    Ok(vec![input[0], input[1], oh, ow])
}

/// Average pooling to a fixed output size (PyTorch's AdaptiveAvgPool2d) when the input divides evenly;
/// identity when the input already has that size.
pub struct AdaptiveAvgPool2d(pub [usize; 2]);

impl AdaptiveAvgPool2d {
    fn geom(&self, input: &[usize]) -> Result<Pool2dGeom> {
        let [oh, ow] = self.0;
        if input.len() != 4 || oh == 0 || ow == 0 || !input[2].is_multiple_of(oh) || !input[3].is_multiple_of(ow) {
            return Err(shape_error(&self.describe(), input, "input height and width must be multiples of the output size"));
        }
        let (kh, kw) = (input[2] / oh, input[3] / ow);
        Ok(Pool2dGeom { kernel: [kh, kw], stride: [kh, kw], padding: [0, 0], ceil_mode: false })
    }
}

impl Module for AdaptiveAvgPool2d {
    fn describe(&self) -> String {
        format!("AdaptiveAvgPool2d({}x{})", self.0[0], self.0[1])
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for AdaptiveAvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.shape().len() == 4 && x.shape()[2..] == self.0 {
            return Ok(x.clone());
        }
        x.avg_pool2d(self.geom(x.shape())?)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.geom(input)?;
        Ok(vec![input[0], input[1], self.0[0], self.0[1]])
    }
}

/// Max pooling (the switches are dropped; use `Tensor::max_pool2d` to keep them).
pub struct MaxPool2d(pub Pool2dGeom);
/// Average pooling.
pub struct AvgPool2d(pub Pool2dGeom);
/// [n, c, h, w] -> [n, c]
pub struct GlobalAvgPool;
/// [n, ...] -> [n, prod(...)]
pub struct Flatten;
/// [n, features] -> [n, c, h, w]
pub struct Unflatten(pub [usize; 3]);

impl Module for MaxPool2d {
    fn describe(&self) -> String {
        let g = &self.0;
        format!("MaxPool2d(k={}, s={}, p={}{})", g.kernel[0], g.stride[0], g.padding[0], if g.ceil_mode { ", ceil" } else { "" })
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for MaxPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.max_pool2d(self.0)?.0)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        pool_shape(self, &self.0, input)
    }
}
impl Module for AvgPool2d {
    fn describe(&self) -> String {
        format!("AvgPool2d(k={}, s={}, p={})", self.0.kernel[0], self.0.stride[0], self.0.padding[0])
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for AvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.avg_pool2d(self.0)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        pool_shape(self, &self.0, input)
    }
}
impl Module for GlobalAvgPool {
    fn describe(&self) -> String {
        "GlobalAvgPool".into()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for GlobalAvgPool {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.global_avg_pool2d()
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() != 4 {
            return Err(shape_error("GlobalAvgPool", input, "expects [n, c, h, w]"));
        }
        Ok(vec![input[0], input[1]])
    }
}
impl Module for Flatten {
    fn describe(&self) -> String {
        "Flatten".into()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Flatten {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.shape().first().copied().unwrap_or(1);
        x.reshape(&[n, x.numel() / n.max(1)])
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(vec![input.first().copied().unwrap_or(1), input.iter().skip(1).product()])
    }
}
impl Module for Unflatten {
    fn describe(&self) -> String {
        format!("Unflatten({}x{}x{})", self.0[0], self.0[1], self.0[2])
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Unflatten {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.shape().first().copied().unwrap_or(1);
        x.reshape(&[n, self.0[0], self.0[1], self.0[2]])
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.iter().skip(1).product::<usize>() != self.0.iter().product::<usize>() {
            return Err(shape_error(&self.describe(), input, "element count differs"));
        }
        Ok(vec![input[0], self.0[0], self.0[1], self.0[2]])
    }
}

/// Batch normalization over the channel axis (1) of [n, c] or [n, c, h, w]: batch statistics while training
/// (running statistics updated with `momentum`, unbiased variance, as PyTorch), running statistics in eval.
/// Parameters `{name}.weight` (γ), `{name}.bias` (β); buffers `{name}.running_mean`, `{name}.running_var`.
pub struct BatchNorm {
    pub weight: Param,
    pub bias: Param,
    pub running_mean: Param,
    pub running_var: Param,
    /// Training batches seen (PyTorch's `num_batches_tracked`, saved as an int64 scalar beside the statistics).
    pub num_batches_tracked: std::sync::Arc<std::sync::atomic::AtomicI64>,
    pub eps: f32,
    pub momentum: f32,
    pub training: bool,
    /// Synchronised batch norm (PyTorch's `SyncBatchNorm`): inside a data-parallel step that sums statistics
    /// ([`crate::parallel::stats_reducer`]), training normalises with the whole batch's statistics, every
    /// replica's rows on every rank, instead of this replica's shard's. Elsewhere it changes nothing.
    pub sync: bool,
}

impl BatchNorm {
    pub fn new(vs: &mut VarStore, name: &str, channels: usize) -> Result<BatchNorm> {
        Ok(BatchNorm {
            weight: vs.param(&format!("{name}.weight"), &[channels], Init::Constant(1.0), false)?,
            bias: vs.param(&format!("{name}.bias"), &[channels], Init::Zeros, false)?,
            running_mean: vs.buffer(&format!("{name}.running_mean"), &[channels], Init::Zeros)?,
            running_var: vs.buffer(&format!("{name}.running_var"), &[channels], Init::Constant(1.0))?,
            num_batches_tracked: vs.counter(&format!("{name}.num_batches_tracked")),
            eps: 1e-5,
            momentum: 0.1,
            training: true,
            sync: false,
        })
    }

    /// Shape that broadcasts a per-channel vector over x.
    fn channel_shape(x: &Tensor) -> Result<Vec<usize>> {
        Self::channel_shape_of(x.shape())
    }
    fn channel_shape_of(shape: &[usize]) -> Result<Vec<usize>> {
        match shape.len() {
            2 | 4 => {
                let mut s = vec![1; shape.len()];
                s[1] = shape[1];
                Ok(s)
            }
            _ => Err(KilnError::Invalid { op: "BatchNorm", shape: shape.to_vec(), message: "expects [n, c] or [n, c, h, w]".into() }),
        }
    }
}

impl BatchNorm {
    /// The fused kernels (Tensor::batch_norm) with `act` applied in the same kernel: in training, with fusion
    /// on, for channels the kernels take; None otherwise.
    pub fn forward_fused(&self, x: &Tensor, act: BiasAct) -> Result<Option<Tensor>> {
        Self::channel_shape(x)?;
        if self.synchronised().is_some() {
            return Ok(None);
        }
        let per_channel = x.numel() / x.shape()[1].max(1);
        if !self.training || !kiln_graph::fusion_enabled(x.device()) || per_channel > kiln_graph::kernels::BN_FUSED_MAX_COUNT || per_channel == 0 {
            return Ok(None);
        }
        let running = Some((self.running_mean.tensor()?, self.running_var.tensor()?, self.momentum));
        self.num_batches_tracked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        x.batch_norm(self.weight.tensor()?, self.bias.tensor()?, self.eps, act, running).map(Some)
    }

    /// The step's statistics collective, when this layer synchronises and is training inside such a step.
    fn synchronised(&self) -> Option<std::rc::Rc<dyn crate::parallel::StatsReducer>> {
        (self.sync && self.training).then(crate::parallel::stats_reducer).flatten()
    }

    /// The formula as composite ops: evaluation mode, fusion off, channels too large for the fused kernels, or
    /// synchronised statistics. Synchronised, the mean and then the variance about it are sums over every
    /// replica (`parallel::all_reduce_sum`, differentiable) divided by the whole batch's count: the two passes
    /// one device makes, so N replicas train as one device with their whole batch.
    fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let cs = Self::channel_shape(x)?;
        let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
        let gamma = self.weight.tensor()?.reshape(&cs)?;
        let beta = self.bias.tensor()?.reshape(&cs)?;
        let sync = self.synchronised();
        let (mean, var) = if self.training {
            let mut count = (x.numel() / cs[1]) as f64;
            let (mean, var) = match &sync {
                None => {
                    let mean = x.mean(&axes, true)?;
                    let centered = x.broadcast_sub(&mean)?;
                    (mean, centered.mul(&centered)?.mean(&axes, true)?)
                }
                Some(reducer) => {
                    let tag = self.weight.name();
                    let mut n = [count];
                    reducer.sum(&format!("{tag} count"), &mut n)?;
                    count = n[0];
                    let mean = crate::parallel::all_reduce_sum(&x.sum(&axes, true)?, &format!("{tag} sum"))?.scale(1.0 / count as f32)?;
                    let centered = x.broadcast_sub(&mean)?;
                    let squares = crate::parallel::all_reduce_sum(&centered.mul(&centered)?.sum(&axes, true)?, &format!("{tag} squares"))?;
                    (mean, squares.scale(1.0 / count as f32)?)
                }
            };
            // Running statistics: outside the graph, written in place into the buffers.
            self.num_batches_tracked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            no_grad(|| -> Result<()> {
                let count = count as f32;
                let unbiased = var.scale(count / (count - 1.0).max(1.0))?;
                let m = self.momentum;
                for (buf, batch) in [(&self.running_mean, &mean), (&self.running_var, &unbiased)] {
                    let running = buf.tensor()?;
                    let updated = running.scale(1.0 - m)?.add(&batch.reshape(running.shape())?.scale(m)?)?;
                    running.device().copy(updated.storage(), running.storage(), 4 * running.numel() as u64)?;
                }
                Ok(())
            })?;
            (mean, var)
        } else {
            (self.running_mean.tensor()?.reshape(&cs)?, self.running_var.tensor()?.reshape(&cs)?)
        };
        let inv_std = var.add_scalar(self.eps)?.sqrt()?;
        x.broadcast_sub(&mean)?.broadcast_div(&inv_std)?.broadcast_mul(&gamma)?.broadcast_add(&beta)
    }
}

impl Module for BatchNorm {
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
    fn set_sync_batch_norm(&mut self, sync: bool) {
        self.sync = sync;
    }
    fn describe(&self) -> String {
        format!("BatchNorm({})", self.weight.shape()[0])
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![&self.weight, &self.bias]
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for BatchNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_fused(x, BiasAct::Identity)? {
            Some(y) => Ok(y),
            None => self.forward_composite(x),
        }
    }
    fn forward_with_activation(&self, x: &Tensor, act: BiasAct) -> Result<Option<Tensor>> {
        self.forward_fused(x, act)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        BatchNorm::channel_shape_of(input).map(|_| input.to_vec())
    }
}

/// Inverted dropout: in training, zero each value with probability `p` and scale the rest by 1/(1-p); identity
/// in evaluation. The mask comes from the GPU generator, seeded, so runs repeat.
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    pub training: bool,
    calls: AtomicU32,
    last_mask: Mutex<Option<Tensor>>,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Result<Dropout> {
        if !(0.0..1.0).contains(&p) {
            return Err(KilnError::Invalid { op: "Dropout", shape: vec![], message: format!("drop probability {p} must be in [0, 1)") });
        }
        Ok(Dropout { p, seed, training: true, calls: AtomicU32::new(0), last_mask: Mutex::new(None) })
    }
    /// The mask of the last training call (for tests).
    pub fn last_mask(&self) -> Option<Tensor> {
        self.last_mask.lock().ok().and_then(|m| m.clone())
    }
}

impl Module for Dropout {
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
    fn describe(&self) -> String {
        format!("Dropout(p={})", self.p)
    }
    /// One mask per training forward pass: after `steps` steps the stream stands at `steps`.
    fn set_rng_position(&mut self, steps: u64) {
        self.calls.store(steps as u32, Ordering::Relaxed);
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Dropout {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.training || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        // Each call draws a fresh stream: the call count picks the seed's sub-stream.
        let call = self.calls.fetch_add(1, Ordering::Relaxed) as u64;
        // In a data-parallel step, a shard starting at row r reads the stream from r's first value on: the masks
        // one device would draw for those rows of the whole batch.
        let per_row = x.numel() / x.shape().first().copied().unwrap_or(1).max(1);
        let offset = (crate::parallel::shard_first_row() as u64).wrapping_mul(per_row as u64) as u32;
        let u = Tensor::rand_gpu_on(x.device(), x.shape(), self.seed.wrapping_add(call.wrapping_mul(0x9E37_79B9_7F4A_7C15)), offset)?;
        let threshold = Tensor::full_on(x.device(), &[1], keep)?;
        let mask = threshold.gt_mask(&u)?.scale(1.0 / keep)?;
        if let Ok(mut m) = self.last_mask.lock() {
            *m = Some(mask.clone());
        }
        x.mul(&mask)
    }
}

/// PyTorch's `nn.Embedding`: `{name}.weight` [num_embeddings, dim], N(0, 1) initially; token ids of any shape
/// (u32) -> [..., dim]. With `padding_idx`, that row starts at zero, reads as zero and gets no gradient. The
/// backward is the counting-sort kernel of index_select (kernels::embedding_backward): O(ids x dim), not
/// O(table x ids x dim).
pub struct Embedding {
    pub weight: Param,
    pub num_embeddings: usize,
    pub dim: usize,
    pub padding_idx: Option<usize>,
    /// 1 everywhere but 0 on the padding row, [num_embeddings, 1], made at the first forward pass.
    keep: std::sync::OnceLock<Tensor>,
}

impl Embedding {
    pub fn new(vs: &mut VarStore, name: &str, num_embeddings: usize, dim: usize, padding_idx: Option<usize>) -> Result<Embedding> {
        if padding_idx.is_some_and(|p| p >= num_embeddings) || num_embeddings == 0 || dim == 0 {
            return Err(shape_error("Embedding", &[num_embeddings, dim], &format!("padding_idx {padding_idx:?} must be below num_embeddings, and both sizes at least 1")));
        }
        let weight = vs.param(&format!("{name}.weight"), &[num_embeddings, dim], Init::Normal { std: 1.0 }, true)?;
        if let Some(p) = padding_idx {
            vs.edit_initial(&weight, |w| w[p * dim..(p + 1) * dim].fill(0.0))?;
        }
        Ok(Embedding { weight, num_embeddings, dim, padding_idx, keep: std::sync::OnceLock::new() })
    }

    /// ids (u32, any shape) -> their rows, [..., dim].
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.dtype() != kiln_graph::DType::U32 {
            return Err(KilnError::DType { op: "Embedding", expected: kiln_graph::DType::U32, got: ids.dtype() });
        }
        let table = match self.padding_idx {
            None => self.weight.tensor()?.clone(),
            Some(p) => {
                let keep = match self.keep.get() {
                    Some(k) => k.clone(),
                    None => {
                        let mask: Vec<f32> = (0..self.num_embeddings).map(|r| (r != p) as u8 as f32).collect();
                        let t = Tensor::from_slice_on(self.weight.tensor()?.device(), &mask, &[self.num_embeddings, 1])?;
                        self.keep.get_or_init(|| t).clone()
                    }
                };
                self.weight.tensor()?.broadcast_mul(&keep)?
            }
        };
        let mut shape = ids.shape().to_vec();
        let rows = table.index_select(0, &ids.reshape(&[ids.numel()])?)?;
        shape.push(self.dim);
        rows.reshape(&shape)
    }
}

impl Module for Embedding {
    fn describe(&self) -> String {
        match self.padding_idx {
            Some(p) => format!("Embedding({}, {}, padding_idx={p})", self.num_embeddings, self.dim),
            None => format!("Embedding({}, {})", self.num_embeddings, self.dim),
        }
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![&self.weight]
    }
}
