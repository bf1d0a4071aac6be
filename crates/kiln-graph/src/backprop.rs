//! The tape and every backward rule, in one place.
//!
//! An op that needs a gradient records an [`Op`] naming its inputs. `loss.backward()` sorts the graph
//! topologically, walks it in reverse and applies `input_grads`: one `match` over the op kinds, each rule
//! written with ordinary tensor ops so the backward pass is recorded and submitted like the forward one.
//! Gradients accumulate: a tensor used twice gets both contributions.

use std::collections::{HashMap, HashSet};

use crate::conv::{conv2d_grads_with, pool2d_grad, Conv2dGeom, Pool2dGeom};
use crate::error::{KilnError, Result};
use crate::kernels::{self, BinaryKind, UnaryKind};
use crate::shape::{split_at_axis, strides};
use crate::tensor::{no_grad, DType, Tensor, TensorId};

/// How a tensor was made. Inputs are held, so the graph lives as long as its output.
pub enum Op {
    Unary(UnaryKind, Tensor, f32, f32),
    /// Broadcasting binary op.
    Binary(BinaryKind, Tensor, Tensor),
    /// Sum over one axis (kept as size 1), times a scale (mean = sum * 1/n).
    Sum(Tensor, usize, f32),
    /// Max over one axis (kept as size 1).
    Max(Tensor, usize),
    /// a, b, trans_a, trans_b
    Matmul(Tensor, Tensor, bool, bool),
    Reshape(Tensor),
    Expand(Tensor),
    Permute(Tensor, Vec<usize>),
    /// x, axis, start
    Slice(Tensor, usize, usize),
    Concat(Vec<Tensor>, usize),
    /// x, indices, axis
    IndexSelect(Tensor, Tensor, usize),
    Softmax(Tensor, usize),
    LogSoftmax(Tensor, usize),
    /// x, weight, and the im2col columns of x when the forward pass kept them for the weight's gradient
    Conv2d(Tensor, Tensor, Conv2dGeom, Option<kiln_wgpu::BufView>),
    /// x, switches
    MaxPool2d(Tensor, Tensor, Pool2dGeom),
    AvgPool2d(Tensor, Pool2dGeom),
    /// x, bias, channel axis: act(x + bias) fused (kernels::bias_act).
    BiasAct(Tensor, Tensor, usize, kernels::BiasAct),
    /// x, gamma, beta, the batch statistics [3, c] (Tensor::batch_norm), the fused activation, eps.
    BatchNorm(Tensor, Tensor, Tensor, Tensor, kernels::BiasAct, f32),
    /// Scaled dot-product attention, fused (attention.rs).
    Attention(Box<crate::attention::AttnSaved>),
    /// x, weight, bias, the per-row (mean, 1/std) [rows, 2], eps: Tensor::layer_norm fused.
    LayerNorm(Tensor, Tensor, Tensor, Tensor, f32),
    /// logits [rows, classes], labels [rows] (u32), log-sum-exp per row: loss::cross_entropy fused.
    CrossEntropy(Tensor, Tensor, Tensor),
    /// An op from outside kiln-graph (custom.rs) and its inputs.
    Custom(std::sync::Arc<dyn crate::custom::CustomOp>, Vec<Tensor>),
    /// Recorded only by `backward_create_graph`: conv2d's input gradient from (grad_y, weight), the input's shape.
    Conv2dInputGrad(Tensor, Tensor, Conv2dGeom, Vec<usize>),
    /// Recorded only by `backward_create_graph`: conv2d's weight gradient from (x, grad_y), the weight's shape.
    Conv2dWeightGrad(Tensor, Tensor, Conv2dGeom, Vec<usize>),
    /// Recorded only by `backward_create_graph`: average pooling's input gradient from grad_y, the input's shape.
    AvgPool2dGrad(Tensor, Pool2dGeom, Vec<usize>),
    /// Recorded only by `backward_create_graph`: max pooling's input gradient from (grad_y, switches), the
    /// input's shape.
    MaxPool2dGrad(Tensor, Tensor, Pool2dGeom, Vec<usize>),
    /// Its adjoint: a tensor of the input's shape read at the switches (src, switches).
    MaxPool2dGather(Tensor, Tensor, Pool2dGeom),
    /// Recorded only by `backward_create_graph`: index_select's gradient from (grad_y, indices), axis, the
    /// input's shape.
    IndexSelectGrad(Tensor, Tensor, usize, Vec<usize>),
    /// A recurrent layer's pass over its steps (rnn.rs): the states at every step boundary.
    RnnSequence(Box<crate::rnn::RnnSaved>),
    /// x [n, c, h, w], rois [k, 5] (vision.rs).
    RoiAlign(Tensor, Tensor, crate::vision::RoiAlignGeom),
    /// RoI-Align's input gradient from (grad_y, rois), the input's shape: its adjoint, so its own gradient is
    /// RoI-Align again.
    RoiAlignGrad(Tensor, Tensor, crate::vision::RoiAlignGeom, Vec<usize>),
    /// x [n, c, h, w] (or a tensor read at fixed switches), rois [k, 5], the argmax [k, c, ph, pw] (vision.rs).
    RoiPool(Tensor, Tensor, Tensor, crate::vision::RoiAlignGeom),
    /// RoI pooling's input gradient from (grad_y, rois, argmax), the input's shape.
    RoiPoolGrad(Tensor, Tensor, Tensor, crate::vision::RoiAlignGeom, Vec<usize>),
}

impl Op {
    /// What the op is, for messages ("log", "matmul", "conv2d", ...).
    pub fn name(&self) -> String {
        let name = match self {
            Op::Unary(kind, ..) => return format!("{kind:?}").to_lowercase(),
            Op::Binary(kind, ..) => return format!("{kind:?}").to_lowercase(),
            Op::Custom(op, _) => return format!("custom op {}", op.name()),
            Op::Sum(..) => "sum",
            Op::Max(..) => "max",
            Op::Matmul(..) => "matmul",
            Op::Reshape(_) => "reshape",
            Op::Expand(_) => "broadcast_to",
            Op::Permute(..) => "permute",
            Op::Slice(..) => "slice",
            Op::Concat(..) => "concat",
            Op::IndexSelect(..) => "index_select",
            Op::Softmax(..) => "softmax",
            Op::LogSoftmax(..) => "log_softmax",
            Op::Conv2d(..) => "conv2d",
            Op::MaxPool2d(..) => "max_pool2d",
            Op::AvgPool2d(..) => "avg_pool2d",
            Op::BiasAct(..) => "bias_act",
            Op::BatchNorm(..) => "batch_norm",
            Op::LayerNorm(..) => "layer_norm",
            Op::Attention(..) => "scaled_dot_product_attention",
            Op::CrossEntropy(..) => "cross_entropy",
            Op::Conv2dInputGrad(..) => "conv2d input gradient",
            Op::Conv2dWeightGrad(..) => "conv2d weight gradient",
            Op::AvgPool2dGrad(..) => "avg_pool2d gradient",
            Op::MaxPool2dGrad(..) => "max_pool2d gradient",
            Op::MaxPool2dGather(..) => "max_pool2d gather",
            Op::IndexSelectGrad(..) => "index_select gradient",
            Op::RnnSequence(..) => "rnn_sequence",
            Op::RoiAlign(..) => "roi_align",
            Op::RoiAlignGrad(..) => "roi_align gradient",
            Op::RoiPool(..) => "roi_pool",
            Op::RoiPoolGrad(..) => "roi_pool gradient",
        };
        name.to_string()
    }

    pub fn inputs(&self) -> Vec<&Tensor> {
        match self {
            Op::Unary(_, x, ..)
            | Op::Sum(x, ..)
            | Op::Max(x, _)
            | Op::Reshape(x)
            | Op::Expand(x)
            | Op::Permute(x, _)
            | Op::Slice(x, ..)
            | Op::Softmax(x, _)
            | Op::LogSoftmax(x, _)
            | Op::AvgPool2d(x, _) => vec![x],
            Op::Binary(_, a, b) | Op::Matmul(a, b, ..) | Op::Conv2d(a, b, ..) | Op::BiasAct(a, b, ..) | Op::Conv2dInputGrad(a, b, ..) | Op::Conv2dWeightGrad(a, b, ..) => vec![a, b],
            Op::AvgPool2dGrad(g, ..) => vec![g],
            Op::MaxPool2dGrad(g, switches, ..) | Op::MaxPool2dGather(g, switches, _) | Op::IndexSelectGrad(g, switches, ..) => vec![g, switches],
            Op::Custom(_, xs) => xs.iter().collect(),
            Op::MaxPool2d(x, switches, _) => vec![x, switches],
            Op::IndexSelect(x, idx, _) => vec![x, idx],
            Op::Concat(xs, _) => xs.iter().collect(),
            Op::BatchNorm(x, gamma, beta, ..) | Op::LayerNorm(x, gamma, beta, ..) => vec![x, gamma, beta],
            Op::CrossEntropy(logits, ..) => vec![logits],
            Op::RnnSequence(s) => s.inputs(),
            Op::Attention(s) => vec![&s.q, &s.k, &s.v],
            // The boxes get no gradient (as in torchvision).
            Op::RoiAlign(x, ..) | Op::RoiAlignGrad(x, ..) | Op::RoiPool(x, ..) | Op::RoiPoolGrad(x, ..) => vec![x],
        }
    }
}

/// The gradients of one backward pass, by tensor.
#[derive(Default)]
pub struct Grads {
    map: HashMap<TensorId, Tensor>,
}

impl Grads {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Sets `t`'s gradient (a hand-made or averaged gradient: data-parallel training, tests). Its shape must be
    /// `t`'s.
    pub fn insert(&mut self, t: &Tensor, g: Tensor) -> Result<()> {
        if g.shape() != t.shape() {
            return crate::error::shape_err("Grads::insert", t.shape(), g.shape(), "a gradient has its tensor's shape");
        }
        self.map.insert(t.id(), g);
        Ok(())
    }
}

fn accumulate(map: &mut HashMap<TensorId, Tensor>, t: &Tensor, g: Tensor) -> Result<()> {
    if g.shape() != t.shape() {
        return Err(KilnError::Backward(format!("a backward rule made a gradient of shape {:?} for {t:?}: every gradient has its tensor's shape", g.shape())));
    }
    let sum = match map.remove(&t.id()) {
        Some(prev) => prev.add(&g)?,
        None => g,
    };
    map.insert(t.id(), sum);
    Ok(())
}

/// Tensors reachable from `root` through recorded ops, inputs before outputs; the walk does not go past the
/// tensors in `stop`.
fn topo_order(root: &Tensor, stop: &HashSet<TensorId>) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if stop.contains(&t.id()) {
            continue;
        }
        if let Some(op) = t.op() {
            // Leaves are pushed first, so they are walked last among the inputs: in reverse order each then
            // comes right after the op that reads it, and its gradient is final (and handed to
            // `backward_with`) before the backward of the ops below. The ops' own order is unchanged.
            let inputs: Vec<&Tensor> = op.inputs().into_iter().filter(|i| i.requires_grad() && !seen.contains(&i.id())).collect();
            let is_leaf = |i: &Tensor| i.op().is_none() || stop.contains(&i.id());
            for i in inputs.iter().filter(|i| is_leaf(i)).chain(inputs.iter().filter(|i| !is_leaf(i))) {
                stack.push(((*i).clone(), false));
            }
        }
    }
    order
}

impl Tensor {
    /// Reverse-mode autograd from this scalar (a loss). Returns the gradient of every leaf that requires one
    /// (the `var`s). A tensor of more than one element is an error: seed it with [`Tensor::backward_from`]. The gradient computation itself is not recorded (it runs under `no_grad`).
    pub fn backward(&self) -> Result<Grads> {
        self.backward_impl(false)
    }

    /// [`Tensor::backward`] that records the gradient computation on the tape, like PyTorch's
    /// `create_graph=True`: the gradients it returns require gradients themselves, so a function of them (a
    /// gradient penalty, a Hessian-vector product) can be differentiated again. Every op supports it: rules
    /// that launch kernels directly are recorded as ops of their own (convolution, pooling, index_select,
    /// slice), the fused ops (bias+activation, batch norm, cross-entropy) are differentiated through their
    /// composite formulas, and a custom op as far as its backward is written with tensor ops.
    pub fn backward_create_graph(&self) -> Result<Grads> {
        self.backward_impl(true)
    }

    /// [`Tensor::backward`] of a tensor of any shape, seeded with `grad` (dLoss/dSelf, of this tensor's
    /// shape): PyTorch's `tensor.backward(gradient)`.
    pub fn backward_from(&self, grad: &Tensor) -> Result<Grads> {
        if grad.shape() != self.shape() {
            return crate::error::shape_err("backward_from", self.shape(), grad.shape(), "the seed gradient has the tensor's shape");
        }
        self.backward_seeded(grad.clone(), false)
    }

    /// [`Tensor::backward`] that hands each leaf's gradient to `on_leaf` as soon as it is final (every op that
    /// reads the leaf has been differentiated), while the backward of the ops before it is still to come: the
    /// last layers' parameters first. Data parallelism starts copying those gradients off the device then.
    pub fn backward_with(&self, on_leaf: &mut OnLeaf) -> Result<Grads> {
        if self.numel() != 1 {
            return Err(KilnError::Backward(format!("{self:?} is not a scalar: backward needs dLoss/dSelf for it (Tensor::backward_from), or reduce it to a scalar first")));
        }
        if !self.requires_grad() {
            return Err(KilnError::Backward(format!("{self:?} does not depend on any tensor that requires a gradient")));
        }
        let seed = self.ones_like()?;
        let map = no_grad(|| backprop(self, seed, &HashSet::new(), false, Some(on_leaf)))?;
        Ok(Grads { map })
    }

    fn backward_impl(&self, create_graph: bool) -> Result<Grads> {
        if self.numel() != 1 {
            return Err(KilnError::Backward(format!("{self:?} is not a scalar: backward needs dLoss/dSelf for it (Tensor::backward_from), or reduce it to a scalar first")));
        }
        self.backward_seeded(self.ones_like()?, create_graph)
    }

    fn backward_seeded(&self, seed: Tensor, create_graph: bool) -> Result<Grads> {
        if !self.requires_grad() {
            return Err(KilnError::Backward(format!("{self:?} does not depend on any tensor that requires a gradient")));
        }
        let run = || -> Result<HashMap<TensorId, Tensor>> { backprop(self, seed, &HashSet::new(), create_graph, None) };
        let map = if create_graph { run()? } else { no_grad(run)? };
        Ok(Grads { map })
    }
}

/// What [`Tensor::backward_with`] calls with each leaf and its final gradient.
pub type OnLeaf<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<()> + 'a;

/// Walks the graph of `root` backwards from `seed` (dLoss/dRoot) and returns the gradients that reach the
/// leaves and the tensors in `stop` (which are not walked past), each also to `on_leaf` when it is final.
fn backprop(root: &Tensor, seed: Tensor, stop: &HashSet<TensorId>, create_graph: bool, mut on_leaf: Option<&mut OnLeaf>) -> Result<HashMap<TensorId, Tensor>> {
    let order = topo_order(root, stop);
    let mut pending: HashMap<TensorId, Tensor> = HashMap::new();
    pending.insert(root.id(), seed);
    let mut reached = HashMap::new();
    for node in order.iter().rev() {
        let Some(g) = pending.remove(&node.id()) else { continue };
        match node.op() {
            Some(op) if !stop.contains(&node.id()) => {
                let grads = crate::anomaly::in_context(|| format!("the backward of {}", op.name()), || input_grads(op, node, &g, create_graph))?;
                for (input, gi) in grads {
                    if input.requires_grad() {
                        accumulate(&mut pending, input, gi)?;
                    }
                }
            }
            _ => {
                if let Some(f) = on_leaf.as_mut() {
                    f(node, &g)?;
                }
                reached.insert(node.id(), g);
            }
        }
    }
    Ok(reached)
}

/// The gradients of a fused op's inputs, by re-running its composite formula on them with recording on and
/// differentiating through that (for `backward_create_graph`: the fused backward kernels are not themselves
/// differentiable; the composite's ops are).
fn through_composite<'a>(inputs: &[&'a Tensor], g: &Tensor, composite: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    let y = composite(&owned)?;
    let stop: HashSet<TensorId> = inputs.iter().map(|t| t.id()).collect();
    if !y.requires_grad() {
        return Ok(vec![]);
    }
    let mut reached = backprop(&y, g.clone(), &stop, true, None)?;
    Ok(inputs.iter().filter_map(|t| reached.remove(&t.id()).map(|gi| (*t, gi))).collect())
}

/// act(pre) with the composite ops.
fn composite_act(pre: Tensor, act: kernels::BiasAct) -> Result<Tensor> {
    match act {
        kernels::BiasAct::Identity => Ok(pre),
        kernels::BiasAct::Relu => pre.relu(),
        kernels::BiasAct::Sigmoid => pre.sigmoid(),
        kernels::BiasAct::Tanh => pre.tanh(),
    }
}

/// The shape that broadcasts a per-channel vector along `axis` of a tensor of rank `rank`.
fn channel_shape(rank: usize, axis: usize, c: usize) -> Vec<usize> {
    (0..rank).map(|a| if a == axis { c } else { 1 }).collect()
}

/// Training-mode batch norm as composite ops (what `Op::BatchNorm` computes; the biased variance normalises).
fn composite_batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, act: kernels::BiasAct) -> Result<Tensor> {
    let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
    let cs = channel_shape(x.rank(), 1, x.shape()[1]);
    let mean = x.mean(&axes, true)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.mul(&centered)?.mean(&axes, true)?;
    let y = centered.broadcast_div(&var.add_scalar(eps)?.sqrt()?)?.broadcast_mul(&gamma.reshape(&cs)?)?.broadcast_add(&beta.reshape(&cs)?)?;
    composite_act(y, act)
}

/// Layer norm as composite ops (what `Op::LayerNorm` computes): over the last `weight.rank()` axes, the biased
/// variance normalises.
pub(crate) fn composite_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    let axes: Vec<usize> = (x.rank() - weight.rank()..x.rank()).collect();
    let mean = x.mean(&axes, true)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.mul(&centered)?.mean(&axes, true)?;
    centered.broadcast_div(&var.add_scalar(eps)?.sqrt()?)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Fused layer norm: dx (and g * xhat) in one kernel per row; the weight's and bias's gradients are column sums.
fn layer_norm_grads<'a>(x: &'a Tensor, w: &'a Tensor, b: &'a Tensor, stats: &Tensor, g: &Tensor) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let d = w.numel();
    let rows = x.numel() / d.max(1);
    let (dx, gxhat) = kernels::ln_backward(&g.view(), &x.view(), &w.view(), &stats.view(), rows, d)?;
    let gw = kernels::reduce(&gxhat, 1, rows, d, false, 1.0)?;
    let gb = kernels::reduce(&g.view(), 1, rows, d, false, 1.0)?;
    Ok(vec![(x, Tensor::make(dx, x.shape().to_vec(), DType::F32, None)), (w, Tensor::make(gw, w.shape().to_vec(), DType::F32, None)), (b, Tensor::make(gb, b.shape().to_vec(), DType::F32, None))])
}

/// `out` = zeros of `shape` with `g` written at `start` along `axis` (the backward of slice).
fn scatter_slice(g: &Tensor, shape: &[usize], axis: usize, start: usize) -> Result<Tensor> {
    let z = Tensor::full_on(g.device(), shape, 0.0)?;
    let st = strides(shape);
    kernels::strided_copy(g.storage(), 0, &strides(g.shape()), z.storage(), start * st[axis], &st, g.shape())?;
    Ok(z)
}

/// Gradient with respect to each input of `op`, given `out` (the op's result) and `g` (dLoss/dOut).
fn input_grads<'a>(op: &'a Op, out: &Tensor, g: &Tensor, create_graph: bool) -> Result<Vec<(&'a Tensor, Tensor)>> {
    if create_graph {
        if let Some(grads) = recorded_input_grads(op, g)? {
            return Ok(grads);
        }
    }
    Ok(match op {
        Op::Unary(kind, x, alpha, beta) => unary_grad(*kind, x, out, g, *alpha, *beta)?.map(|gx| vec![(x, gx)]).unwrap_or_default(),
        Op::Binary(kind, a, b) => binary_grads(*kind, a, b, out, g)?,
        Op::Sum(x, _, scale) => vec![(x, g.broadcast_to(x.shape())?.scale(*scale)?)],
        Op::Max(x, axis) => {
            // PyTorch's amax: the gradient is split evenly among the elements tied for the max.
            let mask = x.eq_mask(out)?;
            let ties = mask.sum(&[*axis], true)?;
            vec![(x, mask.broadcast_div(&ties)?.broadcast_mul(g)?)]
        }
        Op::Matmul(a, b, ta, tb) => matmul_grads(a, b, *ta, *tb, g)?,
        Op::BiasAct(x, bias, axis, act) => bias_act_grads(x, bias, *axis, *act, out, g)?,
        Op::BatchNorm(x, gamma, beta, stats, act, _) => batch_norm_grads(x, gamma, beta, stats, *act, out, g)?,
        Op::RnnSequence(s) => crate::rnn::fused_grads(s, out, g)?,
        Op::LayerNorm(x, w, b, stats, _) => layer_norm_grads(x, w, b, stats, g)?,
        Op::Attention(s) => crate::attention::fused_grads(s, out, g)?,
        Op::CrossEntropy(logits, labels, lse) => {
            // dx = g * (softmax(x) - one_hot(label)) / rows, in one kernel.
            let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
            let dx = kernels::cross_entropy_backward(&g.view(), &logits.view(), &labels.view(), &lse.view(), rows, classes)?;
            vec![(logits, Tensor::make(dx, logits.shape().to_vec(), DType::F32, None))]
        }
        Op::Reshape(x) => vec![(x, g.reshape(x.shape())?)],
        Op::Expand(x) => vec![(x, g.sum_to(x.shape())?)],
        Op::Permute(x, perm) => {
            let mut inverse = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            vec![(x, g.permute(&inverse)?)]
        }
        Op::Slice(x, axis, start) => vec![(x, scatter_slice(g, x.shape(), *axis, *start)?)],
        Op::Concat(xs, axis) => {
            let mut at = 0;
            let mut v = Vec::with_capacity(xs.len());
            for x in xs {
                let len = x.shape()[*axis];
                v.push((x, g.slice(*axis, at, len)?));
                at += len;
            }
            v
        }
        Op::IndexSelect(x, idx, axis) => {
            let (outer, len, inner) = split_at_axis(x.shape(), *axis);
            let gx = kernels::index_select_backward(g.storage(), idx.storage(), outer, len, inner, idx.numel())?;
            vec![(x, Tensor::make(gx, x.shape().to_vec(), DType::F32, None))]
        }
        Op::Softmax(x, axis) => {
            // dx = y * (g - sum(g * y))
            let gy = g.mul(out)?;
            let s = gy.sum(&[*axis], true)?;
            vec![(x, gy.sub(&out.broadcast_mul(&s)?)?)]
        }
        Op::LogSoftmax(x, axis) => {
            // dx = g - softmax(x) * sum(g)
            let s = g.sum(&[*axis], true)?;
            vec![(x, g.sub(&out.exp()?.broadcast_mul(&s)?)?)]
        }
        Op::Conv2d(x, w, geom, cols) => {
            // Dedicated kernels (conv2d.wgsl), or matmuls for 1x1 convolutions.
            let (gx, gw) = conv2d_grads_with(x, w, g, geom, cols.as_ref())?;
            gx.map(|t| (x, t)).into_iter().chain(gw.map(|t| (w, t))).collect()
        }
        Op::MaxPool2d(x, switches, geom) => vec![(x, pool2d_grad(x, Some(switches), g, geom)?)],
        Op::AvgPool2d(x, geom) => vec![(x, pool2d_grad(x, None, g, geom)?)],
        Op::Custom(custom, xs) => crate::custom::checked_grads(custom.as_ref(), xs, out, g, create_graph)?,
        // The ops backward_create_graph records (see conv_grad_op_grads).
        Op::Conv2dInputGrad(gy, w, geom, _) => conv_grad_op_grads(gy, w, geom, g, true)?,
        Op::Conv2dWeightGrad(x, gy, geom, _) => conv_grad_op_grads(gy, x, geom, g, false)?,
        Op::AvgPool2dGrad(gy, geom, _) => vec![(gy, g.avg_pool2d(*geom)?)],
        Op::MaxPool2dGrad(gy, switches, geom, _) => vec![(gy, max_pool2d_gather(g, switches, geom)?)],
        Op::MaxPool2dGather(src, switches, geom) => vec![(src, max_pool2d_grad(g, switches, geom, src.shape())?)],
        Op::IndexSelectGrad(gy, idx, axis, _) => vec![(gy, g.index_select(*axis, idx)?)],
        Op::RoiAlign(x, rois, geom) => vec![(x, crate::vision::roi_align_grad(g, rois, geom, x.shape())?)],
        Op::RoiAlignGrad(gy, rois, geom, _) => vec![(gy, g.roi_align(rois, *geom)?)],
        Op::RoiPool(x, rois, argmax, geom) => vec![(x, crate::vision::roi_pool_grad(g, rois, argmax, geom, x.shape())?)],
        Op::RoiPoolGrad(gy, rois, argmax, geom, _) => vec![(gy, crate::vision::roi_pool_gather(g, rois, argmax, geom)?)],
    })
}

/// a @ b with either read transposed: the two products that are needed (a network's input images want no
/// gradient).
fn matmul_grads<'a>(a: &'a Tensor, b: &'a Tensor, ta: bool, tb: bool, g: &Tensor) -> Result<Vec<(&'a Tensor, Tensor)>> {
    // With a shared 2-D right operand and a batched left one, lift b to a batch and sum its gradient.
    let b3;
    let b_eff = if a.rank() == 3 && b.rank() == 2 && ta {
        b3 = b.broadcast_to(&[a.shape()[0], b.shape()[0], b.shape()[1]])?;
        &b3
    } else {
        b
    };
    let mut grads = Vec::with_capacity(2);
    if a.requires_grad() {
        let ga = if ta { b_eff.matmul_t(g, tb, true)? } else { g.matmul_t(b_eff, false, !tb)? };
        grads.push((a, ga));
    }
    if b.requires_grad() {
        let gb = if tb { g.matmul_t(a, true, ta)? } else { a.matmul_t(g, !ta, false)? };
        let gb = if gb.rank() == 3 && b.rank() == 2 { gb.sum(&[0], false)? } else { gb };
        grads.push((b, gb));
    }
    Ok(grads)
}

/// The rules of the two ops `backward_create_graph` records for conv2d's gradients. With y = B(x, w) the
/// convolution (bilinear), Conv2dInputGrad is B_x^T(w) gy and Conv2dWeightGrad is B_w^T(x) gy, so for an
/// incoming gradient g: d/dgy of either is the convolution B(g, w) or B(x, g), d/dw of the first is
/// B_w^T(g) gy and d/dx of the second is B_x^T(g) gy. `other` is w (`input_grad`) or x.
fn conv_grad_op_grads<'a>(gy: &'a Tensor, other: &'a Tensor, geom: &Conv2dGeom, g: &Tensor, input_grad: bool) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let mut v = Vec::with_capacity(2);
    if gy.requires_grad() {
        v.push((gy, if input_grad { g.conv2d(other, *geom)? } else { other.conv2d(g, *geom)? }));
    }
    if other.requires_grad() {
        let go = if input_grad { conv2d_weight_grad(g, gy, geom, other.shape())? } else { conv2d_input_grad(gy, g, geom, other.shape())? };
        v.push((other, go));
    }
    Ok(v)
}

/// The unary ops' rules (None for the masks and fills, which pass no gradient).
fn unary_grad(kind: UnaryKind, x: &Tensor, out: &Tensor, g: &Tensor, alpha: f32, beta: f32) -> Result<Option<Tensor>> {
    use UnaryKind as U;
    Ok(Some(match kind {
        U::Neg => g.neg()?,
        U::Exp => g.mul(out)?,
        U::Log => g.div(x)?,
        U::Sqrt => g.div(out)?.scale(0.5)?,
        U::Abs => g.mul(&x.unary_raw(U::Sign, 0.0, 0.0)?)?,
        U::Sigmoid => g.mul(&out.mul(&out.affine(-1.0, 1.0)?)?)?,
        U::Tanh => g.mul(&out.mul(out)?.affine(-1.0, 1.0)?)?,
        U::Relu => g.mul(&x.unary_raw(U::Step, 0.0, 0.0)?)?,
        U::LeakyRelu => g.mul(&x.unary_raw(U::LeakyStep, alpha, 0.0)?)?,
        U::Softplus => g.mul(&x.sigmoid()?)?,
        U::Clamp => g.mul(&x.unary_raw(U::InRange, alpha, beta)?)?,
        U::Powf => g.mul(&x.powf(alpha - 1.0)?.scale(alpha)?)?,
        U::Affine => g.scale(alpha)?,
        // d/dx erf(x) = 2 / sqrt(pi) exp(-x^2)
        U::Erf => g.mul(&x.mul(x)?.neg()?.exp()?.scale(2.0 / std::f32::consts::PI.sqrt())?)?,
        U::Step | U::Sign | U::LeakyStep | U::InRange | U::Fill => return Ok(None),
    }))
}

/// The broadcasting binary ops' rules: each gradient summed back to its input's shape.
fn binary_grads<'a>(kind: BinaryKind, a: &'a Tensor, b: &'a Tensor, out: &Tensor, g: &Tensor) -> Result<Vec<(&'a Tensor, Tensor)>> {
    Ok(match kind {
        BinaryKind::Add => vec![(a, g.sum_to(a.shape())?), (b, g.sum_to(b.shape())?)],
        BinaryKind::Sub => vec![(a, g.sum_to(a.shape())?), (b, g.neg()?.sum_to(b.shape())?)],
        BinaryKind::Mul => vec![(a, g.broadcast_mul(b)?.sum_to(a.shape())?), (b, g.broadcast_mul(a)?.sum_to(b.shape())?)],
        BinaryKind::Div => {
            let ga = g.broadcast_div(b)?;
            let gb = ga.broadcast_mul(out)?.neg()?; // -g a / b^2 = -(g / b) * (a / b)
            vec![(a, ga.sum_to(a.shape())?), (b, gb.sum_to(b.shape())?)]
        }
        BinaryKind::Maximum | BinaryKind::Minimum => {
            // The larger (smaller) input takes the gradient; ties go to `a`.
            let a_wins = if kind == BinaryKind::Maximum { b.gt_mask(a)? } else { a.gt_mask(b)? }.affine(-1.0, 1.0)?;
            let ga = g.broadcast_mul(&a_wins)?;
            let gb = g.sub(&ga)?;
            vec![(a, ga.sum_to(a.shape())?), (b, gb.sum_to(b.shape())?)]
        }
        BinaryKind::Eq | BinaryKind::Gt => vec![],
    })
}

/// act(x + bias): g_pre = g * act'(pre) in one kernel (from the saved output); the bias gets g_pre summed over
/// every axis but its channel axis.
fn bias_act_grads<'a>(x: &'a Tensor, bias: &'a Tensor, axis: usize, act: kernels::BiasAct, out: &Tensor, g: &Tensor) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let g_pre = if act == kernels::BiasAct::Identity { g.clone() } else { Tensor::from_storage(kernels::act_backward(&g.view(), &out.view(), g.numel(), act)?, g.shape(), DType::F32)? };
    let others: Vec<usize> = (0..x.rank()).filter(|a| *a != axis).collect();
    let g_bias = g_pre.sum(&others, false)?.reshape(bias.shape())?;
    Ok(vec![(x, g_pre), (bias, g_bias)])
}

/// Fused batch norm: one per-channel reduction (sums of g_pre and g_pre * xhat, which are beta's and gamma's
/// gradients), then dx elementwise; g_pre = g * act'(y) inside both kernels.
fn batch_norm_grads<'a>(x: &'a Tensor, gamma: &'a Tensor, beta: &'a Tensor, stats: &Tensor, act: kernels::BiasAct, out: &Tensor, g: &Tensor) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let s = crate::ops::norm_shape("batch_norm backward", x.shape())?;
    let (gv, yv, xv, sv) = (g.view(), out.view(), x.view(), stats.view());
    let (g_beta, g_gamma) = kernels::bn_backward_reduce(&gv, &yv, &xv, &sv, s, act)?;
    let mut grads = Vec::with_capacity(3);
    if x.requires_grad() {
        let dx = kernels::bn_backward_apply(&gv, &yv, &xv, &sv, &gamma.view(), &g_beta, &g_gamma, s, act)?;
        grads.push((x, Tensor::make(dx, x.shape().to_vec(), DType::F32, None)));
    }
    grads.push((gamma, Tensor::make(g_gamma, vec![s.c], DType::F32, None)));
    grads.push((beta, Tensor::make(g_beta, vec![s.c], DType::F32, None)));
    Ok(grads)
}

/// Under `backward_create_graph`, the rules whose first-order form launches kernels the tape cannot see:
/// recorded instead as ops with backward rules of their own, or through the fused op's composite formula.
/// `None` for every other op (their rules are already written with recorded tensor ops).
fn recorded_input_grads<'a>(op: &'a Op, g: &Tensor) -> Result<Option<Vec<(&'a Tensor, Tensor)>>> {
    Ok(Some(match op {
        Op::BiasAct(x, bias, axis, act) => {
            let (axis, act) = (*axis, *act);
            through_composite(&[x, bias], g, |t| composite_act(t[0].broadcast_add(&t[1].reshape(&channel_shape(t[0].rank(), axis, t[1].numel()))?)?, act))?
        }
        Op::BatchNorm(x, gamma, beta, _, act, eps) => through_composite(&[x, gamma, beta], g, |t| composite_batch_norm(&t[0], &t[1], &t[2], *eps, *act))?,
        Op::RnnSequence(s) => through_composite(&s.inputs(), g, |t| crate::rnn::composite_of(s, t))?,
        Op::LayerNorm(x, w, b, _, eps) => through_composite(&[x, w, b], g, |t| composite_layer_norm(&t[0], &t[1], &t[2], *eps))?,
        Op::Attention(s) => through_composite(&[&s.q, &s.k, &s.v], g, |t| crate::attention::composite_of(s, t))?,
        Op::CrossEntropy(logits, labels, _) => {
            let one_hot = Tensor::one_hot(labels, logits.shape()[1])?;
            through_composite(&[logits], g, |t| crate::loss::cross_entropy_one_hot(&t[0], &one_hot))?
        }
        Op::Slice(x, axis, start) => {
            // Zeros around g, by concatenation (recorded; its backward is the slice again).
            let (axis, start, len) = (*axis, *start, g.shape()[*axis]);
            let zeros = |n: usize| -> Result<Tensor> {
                let mut s = x.shape().to_vec();
                s[axis] = n;
                Tensor::full_on(g.device(), &s, 0.0)
            };
            let after = x.shape()[axis] - start - len;
            let mut parts = Vec::with_capacity(3);
            if start > 0 {
                parts.push(zeros(start)?);
            }
            parts.push(g.clone());
            if after > 0 {
                parts.push(zeros(after)?);
            }
            vec![(x, Tensor::concat(&parts.iter().collect::<Vec<_>>(), axis)?)]
        }
        Op::Conv2d(x, w, geom, _) => {
            let mut v = Vec::with_capacity(2);
            if x.requires_grad() {
                v.push((x, conv2d_input_grad(g, w, geom, x.shape())?));
            }
            if w.requires_grad() {
                v.push((w, conv2d_weight_grad(x, g, geom, w.shape())?));
            }
            v
        }
        Op::AvgPool2d(x, geom) => vec![(x, avg_pool2d_grad(g, geom, x.shape())?)],
        Op::MaxPool2d(x, switches, geom) => vec![(x, max_pool2d_grad(g, switches, geom, x.shape())?)],
        Op::IndexSelect(x, idx, axis) => {
            let (outer, len, inner) = split_at_axis(x.shape(), *axis);
            let gx = kernels::index_select_backward(g.storage(), idx.storage(), outer, len, inner, idx.numel())?;
            vec![(x, Tensor::make(gx, x.shape().to_vec(), DType::F32, Some(Op::IndexSelectGrad(g.clone(), idx.clone(), *axis, x.shape().to_vec()))))]
        }
        _ => return Ok(None),
    }))
}

/// conv2d's input gradient from (grad_y, weight), recorded (Op::Conv2dInputGrad).
fn conv2d_input_grad(gy: &Tensor, w: &Tensor, geom: &Conv2dGeom, x_shape: &[usize]) -> Result<Tensor> {
    let gx = crate::conv::conv2d_input_grad_raw(gy, w, geom, x_shape)?;
    Ok(Tensor::make(gx, x_shape.to_vec(), DType::F32, Some(Op::Conv2dInputGrad(gy.clone(), w.clone(), *geom, x_shape.to_vec()))))
}

/// conv2d's weight gradient from (x, grad_y), recorded (Op::Conv2dWeightGrad).
fn conv2d_weight_grad(x: &Tensor, gy: &Tensor, geom: &Conv2dGeom, w_shape: &[usize]) -> Result<Tensor> {
    let gw = crate::conv::conv2d_weight_grad_raw(x, gy, geom, w_shape)?;
    Ok(Tensor::make(gw, w_shape.to_vec(), DType::F32, Some(Op::Conv2dWeightGrad(x.clone(), gy.clone(), *geom, w_shape.to_vec()))))
}

/// Max pooling's input gradient, recorded (Op::MaxPool2dGrad).
pub(crate) fn max_pool2d_grad(gy: &Tensor, switches: &Tensor, geom: &Pool2dGeom, x_shape: &[usize]) -> Result<Tensor> {
    let gx = crate::conv::pool2d_grad_raw(x_shape, Some(switches), gy, geom)?;
    Ok(Tensor::make(gx, x_shape.to_vec(), DType::F32, Some(Op::MaxPool2dGrad(gy.clone(), switches.clone(), *geom, x_shape.to_vec()))))
}

/// `src` read at max pooling's switches, recorded (Op::MaxPool2dGather).
fn max_pool2d_gather(src: &Tensor, switches: &Tensor, geom: &Pool2dGeom) -> Result<Tensor> {
    let y = crate::conv::max_pool2d_gather_raw(src, switches, geom)?;
    Ok(Tensor::make(y, switches.shape().to_vec(), DType::F32, Some(Op::MaxPool2dGather(src.clone(), switches.clone(), *geom))))
}

/// Average pooling's input gradient, recorded (Op::AvgPool2dGrad).
fn avg_pool2d_grad(gy: &Tensor, geom: &Pool2dGeom, x_shape: &[usize]) -> Result<Tensor> {
    let gx = crate::conv::pool2d_grad_raw(x_shape, None, gy, geom)?;
    Ok(Tensor::make(gx, x_shape.to_vec(), DType::F32, Some(Op::AvgPool2dGrad(gy.clone(), *geom, x_shape.to_vec()))))
}

impl Tensor {
    /// A unary kernel without recording (masks and derivative helpers).
    pub(crate) fn unary_raw(&self, kind: UnaryKind, alpha: f32, beta: f32) -> Result<Tensor> {
        let y = kernels::unary(kind, &self.view(), self.numel(), alpha, beta)?;
        Ok(Tensor::make(y, self.shape().to_vec(), DType::F32, None))
    }
}
