//! Tensor ops: validate shapes (errors name the op and both shapes), launch the kernel, record the op for
//! autograd. Every op's backward rule is in backprop.rs.

use crate::backprop::Op;
use crate::error::{invalid, shape_err, Result};
use crate::kernels::{self, BinaryKind, UnaryKind};
use crate::shape::{broadcast_shapes, numel, split_at_axis, strides};
use crate::tensor::{DType, Tensor};

impl Tensor {
    fn unary_op(&self, kind: UnaryKind, alpha: f32, beta: f32) -> Result<Tensor> {
        self.expect_dtype("unary", DType::F32)?;
        let y = kernels::unary(kind, &self.view(), self.numel(), alpha, beta)?;
        Ok(Tensor::make(y, self.shape().to_vec(), DType::F32, Some(Op::Unary(kind, self.clone(), alpha, beta))))
    }

    pub fn neg(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Neg, 0.0, 0.0)
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Exp, 0.0, 0.0)
    }
    pub fn log(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Log, 0.0, 0.0)
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Sqrt, 0.0, 0.0)
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Abs, 0.0, 0.0)
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Sigmoid, 0.0, 0.0)
    }
    /// The error function (to within 1.5e-7; Abramowitz and Stegun 7.1.26).
    pub fn erf(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Erf, 0.0, 0.0)
    }
    /// GELU as PyTorch's default: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
    pub fn gelu(&self) -> Result<Tensor> {
        self.mul(&self.scale(std::f32::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?)
    }
    /// GELU's tanh approximation (PyTorch's `approximate="tanh"`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        let inner = self.add(&self.powf(3.0)?.scale(0.044715)?)?.scale((2.0 / std::f32::consts::PI).sqrt())?;
        self.mul(&inner.tanh()?.affine(0.5, 0.5)?)
    }
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Tanh, 0.0, 0.0)
    }
    /// act(x + bias) with `bias` [x.shape[axis]] added along `axis`, in one kernel (a layer's bias and
    /// activation fused; the backward rule is one kernel plus the bias reduction).
    pub fn bias_act(&self, bias: &Tensor, axis: usize, act: kernels::BiasAct) -> Result<Tensor> {
        self.expect_dtype("bias_act", DType::F32)?;
        bias.expect_dtype("bias_act", DType::F32)?;
        self.check_axis("bias_act", axis)?;
        let channels = self.shape()[axis];
        if bias.numel() != channels || bias.rank() != 1 {
            return shape_err("bias_act", self.shape(), bias.shape(), format!("the bias must be [{channels}], the size of axis {axis}"));
        }
        let inner: usize = self.shape()[axis + 1..].iter().product();
        let y = kernels::bias_act(&self.view(), &bias.view(), self.numel(), channels, inner, act)?;
        Ok(Tensor::make(y, self.shape().to_vec(), DType::F32, Some(Op::BiasAct(self.clone(), bias.clone(), axis, act))))
    }

    /// Training-mode batch normalisation over every axis but axis 1 of x [n, c, ...], fused (norm.wgsl):
    /// act((x - mean) / sqrt(var + eps) * gamma + beta) with this batch's per-channel statistics, in two
    /// kernels (its backward rule in two more). With `running` = (mean, var, momentum), those [c] buffers are
    /// moved towards this batch's mean and unbiased variance in place (one more kernel, outside the graph).
    /// Channels of more than `kernels::BN_FUSED_MAX_COUNT` values are refused: compose the formula instead.
    pub fn batch_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f32, act: kernels::BiasAct, running: Option<(&Tensor, &Tensor, f32)>) -> Result<Tensor> {
        for t in [self, gamma, beta] {
            t.expect_dtype("batch_norm", DType::F32)?;
        }
        let s = norm_shape("batch_norm", self.shape())?;
        for p in [gamma, beta] {
            if p.shape() != [s.c] {
                return shape_err("batch_norm", self.shape(), p.shape(), format!("gamma and beta must be [{}], one value per channel (axis 1)", s.c));
            }
        }
        if let Some((mean, var, _)) = running {
            if mean.shape() != [s.c] || var.shape() != [s.c] {
                return shape_err("batch_norm", mean.shape(), var.shape(), format!("running mean and variance must be [{}]", s.c));
            }
        }
        let stats = kernels::bn_stats(&self.view(), s, eps)?;
        let y = kernels::bn_apply(&self.view(), &stats, &gamma.view(), &beta.view(), s, act)?;
        if let Some((mean, var, momentum)) = running {
            kernels::bn_running_update(&stats, mean.storage(), var.storage(), s, momentum)?;
        }
        let stats = Tensor::make(stats, vec![3, s.c], DType::F32, None);
        let op = Op::BatchNorm(self.clone(), gamma.clone(), beta.clone(), stats, act, eps);
        Ok(Tensor::make(y, self.shape().to_vec(), DType::F32, Some(op)))
    }

    /// Layer normalisation over the last `weight.rank()` axes (PyTorch's `F.layer_norm`: biased variance,
    /// then `* weight + bias`), fused: one kernel forward (norm.wgsl's ln_forward, per-row mean and 1/std kept),
    /// one kernel and two column sums backward. With fusion off, the composite formula.
    pub fn layer_norm(&self, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
        for t in [self, weight, bias] {
            t.expect_dtype("layer_norm", DType::F32)?;
        }
        let k = weight.rank();
        if k == 0 || k > self.rank() || self.shape()[self.rank() - k..] != *weight.shape() || bias.shape() != weight.shape() {
            return shape_err("layer_norm", self.shape(), weight.shape(), format!("the weight and bias (bias {:?}) must have the shape of x's last axes", bias.shape()));
        }
        if !crate::fusion_enabled(self.device()) {
            return crate::backprop::composite_layer_norm(self, weight, bias, eps);
        }
        let d = weight.numel();
        let rows = self.numel() / d.max(1);
        let (y, stats) = kernels::ln_forward(&self.view(), &weight.view(), &bias.view(), rows, d, eps)?;
        let stats = Tensor::make(stats, vec![rows, 2], DType::F32, None);
        Ok(Tensor::make(y, self.shape().to_vec(), DType::F32, Some(Op::LayerNorm(self.clone(), weight.clone(), bias.clone(), stats, eps))))
    }

    pub fn relu(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Relu, 0.0, 0.0)
    }
    pub fn leaky_relu(&self, slope: f32) -> Result<Tensor> {
        self.unary_op(UnaryKind::LeakyRelu, slope, 0.0)
    }
    pub fn softplus(&self) -> Result<Tensor> {
        self.unary_op(UnaryKind::Softplus, 0.0, 0.0)
    }
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        if lo > hi {
            return invalid("clamp", self.shape(), format!("lo {lo} > hi {hi}"));
        }
        self.unary_op(UnaryKind::Clamp, lo, hi)
    }
    /// x^p. For negative x and a non-integer p the result is |x|^p (the real power is undefined there).
    pub fn powf(&self, p: f32) -> Result<Tensor> {
        self.unary_op(UnaryKind::Powf, p, 0.0)
    }
    /// scale * x + shift
    pub fn affine(&self, scale: f32, shift: f32) -> Result<Tensor> {
        self.unary_op(UnaryKind::Affine, scale, shift)
    }
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        self.affine(s, 0.0)
    }
    pub fn add_scalar(&self, s: f32) -> Result<Tensor> {
        self.affine(1.0, s)
    }

    fn binary_op(&self, kind: BinaryKind, other: &Tensor, broadcast: bool, name: &'static str) -> Result<Tensor> {
        self.expect_dtype(name, DType::F32)?;
        other.expect_dtype(name, DType::F32)?;
        let shape = if broadcast {
            match broadcast_shapes(self.shape(), other.shape()) {
                Some(s) => s,
                None => return shape_err(name, self.shape(), other.shape(), "not broadcastable"),
            }
        } else {
            if self.shape() != other.shape() {
                return shape_err(name, self.shape(), other.shape(), "use the broadcast_ form to broadcast");
            }
            self.shape().to_vec()
        };
        let y = kernels::binary(kind, &self.view(), self.shape(), &other.view(), other.shape(), &shape)?;
        Ok(Tensor::make(y, shape, DType::F32, Some(Op::Binary(kind, self.clone(), other.clone()))))
    }

    pub fn add(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Add, o, false, "add")
    }
    pub fn sub(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Sub, o, false, "sub")
    }
    pub fn mul(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Mul, o, false, "mul")
    }
    pub fn div(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Div, o, false, "div")
    }
    pub fn broadcast_add(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Add, o, true, "broadcast_add")
    }
    pub fn broadcast_sub(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Sub, o, true, "broadcast_sub")
    }
    pub fn broadcast_mul(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Mul, o, true, "broadcast_mul")
    }
    pub fn broadcast_div(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Div, o, true, "broadcast_div")
    }
    pub fn broadcast_maximum(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Maximum, o, true, "broadcast_maximum")
    }
    pub fn broadcast_minimum(&self, o: &Tensor) -> Result<Tensor> {
        self.binary_op(BinaryKind::Minimum, o, true, "broadcast_minimum")
    }
    /// 1.0 where self == o, else 0.0 (broadcasting; no gradient).
    pub fn eq_mask(&self, o: &Tensor) -> Result<Tensor> {
        Ok(self.binary_op(BinaryKind::Eq, o, true, "eq_mask")?.detach())
    }
    /// 1.0 where self > o, else 0.0 (broadcasting; no gradient).
    pub fn gt_mask(&self, o: &Tensor) -> Result<Tensor> {
        Ok(self.binary_op(BinaryKind::Gt, o, true, "gt_mask")?.detach())
    }

    fn check_axis(&self, op: &'static str, axis: usize) -> Result<()> {
        if axis >= self.rank() {
            return invalid(op, self.shape(), format!("axis {axis} out of range for rank {}", self.rank()));
        }
        Ok(())
    }

    fn reduce_one(&self, axis: usize, max: bool, scale: f32) -> Result<Tensor> {
        let (outer, len, inner) = split_at_axis(self.shape(), axis);
        let y = kernels::reduce(&self.view(), outer, len, inner, max, scale)?;
        let mut shape = self.shape().to_vec();
        shape[axis] = 1;
        let op = if max { Op::Max(self.clone(), axis) } else { Op::Sum(self.clone(), axis, scale) };
        Ok(Tensor::make(y, shape, DType::F32, Some(op)))
    }

    fn reduce_axes(&self, op: &'static str, axes: &[usize], keepdim: bool, mean: bool) -> Result<Tensor> {
        self.expect_dtype(op, DType::F32)?;
        let mut axes = axes.to_vec();
        axes.sort_unstable();
        axes.dedup();
        for &a in &axes {
            self.check_axis(op, a)?;
        }
        let mut t = self.clone();
        for &a in &axes {
            let scale = if mean { 1.0 / self.shape()[a].max(1) as f32 } else { 1.0 };
            t = t.reduce_one(a, false, scale)?;
        }
        if keepdim {
            Ok(t)
        } else {
            let shape: Vec<usize> = self.shape().iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
            t.reshape(&shape)
        }
    }

    /// Sum over `axes` (keepdim keeps them as size 1).
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce_axes("sum", axes, keepdim, false)
    }
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce_axes("mean", axes, keepdim, true)
    }
    /// Sum of every element, shape [].
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reshape(&[self.numel()])?.sum(&[0], false)
    }
    pub fn mean_all(&self) -> Result<Tensor> {
        self.reshape(&[self.numel()])?.mean(&[0], false)
    }
    /// Max over one axis.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.expect_dtype("max", DType::F32)?;
        self.check_axis("max", axis)?;
        if self.shape()[axis] == 0 {
            return invalid("max", self.shape(), "max over an empty axis");
        }
        let t = self.reduce_one(axis, true, 1.0)?;
        if keepdim {
            Ok(t)
        } else {
            let mut shape = self.shape().to_vec();
            shape.remove(axis);
            t.reshape(&shape)
        }
    }

    /// Sums a broadcast gradient back to `shape` (the inverse of broadcasting to self's shape).
    pub fn sum_to(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        if broadcast_shapes(shape, self.shape()).as_deref() != Some(self.shape()) {
            return shape_err("sum_to", self.shape(), shape, "target does not broadcast to the source");
        }
        let off = self.rank() - shape.len();
        let axes: Vec<usize> = (0..self.rank()).filter(|&d| d < off || (shape[d - off] == 1 && self.shape()[d] != 1)).collect();
        self.sum(&axes, true)?.reshape(shape)
    }

    /// Same storage, new shape (free).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return shape_err("reshape", self.shape(), shape, "element counts differ");
        }
        Ok(Tensor::make(self.storage().clone(), shape.to_vec(), self.dtype(), Some(Op::Reshape(self.clone()))))
    }

    /// Broadcast to a larger shape (numpy rules), materialised.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        if broadcast_shapes(self.shape(), shape).as_deref() != Some(shape) {
            return shape_err("broadcast_to", self.shape(), shape, "not broadcastable");
        }
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let y = self.device().alloc((numel(shape).max(1) * 4) as u64, "broadcast_to")?;
        kernels::strided_copy(&self.view(), 0, &crate::shape::broadcast_strides(self.shape(), shape), &y, 0, &strides(shape), shape)?;
        Ok(Tensor::make(y, shape.to_vec(), self.dtype(), Some(Op::Expand(self.clone()))))
    }

    /// Reorders axes: out.shape[i] = self.shape[perm[i]].
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank() || perm.iter().any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true)) {
            return shape_err("permute", self.shape(), perm, "not a permutation of the axes");
        }
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape()[p]).collect();
        let st = strides(self.shape());
        let src_strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let y = self.device().alloc((self.numel().max(1) * 4) as u64, "permute")?;
        kernels::strided_copy(&self.view(), 0, &src_strides, &y, 0, &strides(&shape), &shape)?;
        Ok(Tensor::make(y, shape, self.dtype(), Some(Op::Permute(self.clone(), perm.to_vec()))))
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        self.check_axis("transpose", a.max(b))?;
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Transpose of a matrix.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() != 2 {
            return invalid("t", self.shape(), "t() needs a matrix; use transpose(a, b)");
        }
        self.transpose(0, 1)
    }

    /// Elements [start, start + len) along `axis`.
    pub fn slice(&self, axis: usize, start: usize, len: usize) -> Result<Tensor> {
        self.check_axis("slice", axis)?;
        if start + len > self.shape()[axis] {
            return invalid("slice", self.shape(), format!("range {start}..{} exceeds axis {axis}", start + len));
        }
        let mut shape = self.shape().to_vec();
        shape[axis] = len;
        let y = self.device().alloc((numel(&shape).max(1) * 4) as u64, "slice")?;
        let st = strides(self.shape());
        kernels::strided_copy(&self.view(), start * st[axis], &st, &y, 0, &strides(&shape), &shape)?;
        Ok(Tensor::make(y, shape, self.dtype(), Some(Op::Slice(self.clone(), axis, start))))
    }

    /// Joins tensors along `axis`; all other dims must match.
    pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
        let first = match xs.first() {
            Some(f) => *f,
            None => return invalid("concat", &[], "no tensors to concatenate"),
        };
        first.check_axis("concat", axis)?;
        let mut shape = first.shape().to_vec();
        shape[axis] = 0;
        for x in xs {
            let same_rest = x.rank() == first.rank() && (0..x.rank()).all(|d| d == axis || x.shape()[d] == first.shape()[d]);
            if !same_rest || x.dtype() != first.dtype() {
                return shape_err("concat", first.shape(), x.shape(), format!("dims other than {axis} must match"));
            }
            shape[axis] += x.shape()[axis];
        }
        if let Some(x) = xs.iter().find(|x| x.device() != first.device()) {
            return Err(kiln_wgpu::GpuError::CrossDevice { what: "concat".into(), a: first.device().describe(), b: x.device().describe() }.into());
        }
        let y = first.device().alloc((numel(&shape).max(1) * 4) as u64, "concat")?;
        let out_strides = strides(&shape);
        let mut at = 0;
        for x in xs {
            kernels::strided_copy(&x.view(), 0, &strides(x.shape()), &y, at * out_strides[axis], &out_strides, x.shape())?;
            at += x.shape()[axis];
        }
        let op = Op::Concat(xs.iter().map(|x| (*x).clone()).collect(), axis);
        Ok(Tensor::make(y, shape, first.dtype(), Some(op)))
    }

    /// Picks entries `indices` (u32, rank 1) along `axis`. An index out of range reads NaN (the error shows in the
    /// loss; `kiln_graph::anomaly` names the op).
    pub fn index_select(&self, axis: usize, indices: &Tensor) -> Result<Tensor> {
        self.expect_dtype("index_select", DType::F32)?;
        indices.expect_dtype("index_select", DType::U32)?;
        self.check_axis("index_select", axis)?;
        if indices.rank() != 1 {
            return shape_err("index_select", self.shape(), indices.shape(), "indices must be rank 1");
        }
        let (outer, len, inner) = split_at_axis(self.shape(), axis);
        let n_idx = indices.numel();
        let y = kernels::index_select(&self.view(), &indices.view(), outer, len, inner, n_idx)?;
        let mut shape = self.shape().to_vec();
        shape[axis] = n_idx;
        Ok(Tensor::make(y, shape, DType::F32, Some(Op::IndexSelect(self.clone(), indices.clone(), axis))))
    }

    /// labels [n] (u32) -> [n, classes] of 0/1.
    pub fn one_hot(labels: &Tensor, classes: usize) -> Result<Tensor> {
        labels.expect_dtype("one_hot", DType::U32)?;
        if labels.rank() != 1 || classes == 0 {
            return invalid("one_hot", labels.shape(), format!("needs rank-1 labels and classes > 0 (got {classes})"));
        }
        let n = labels.numel();
        let y = kernels::one_hot(&labels.view(), n, classes)?;
        Ok(crate::anomaly::in_context(|| "one_hot (a label out of range makes its row NaN)".into(), || Tensor::make(y, vec![n, classes], DType::F32, None)))
    }

    fn softmax_op(&self, axis: usize, log: bool) -> Result<Tensor> {
        let name = if log { "log_softmax" } else { "softmax" };
        self.expect_dtype(name, DType::F32)?;
        self.check_axis(name, axis)?;
        let (outer, len, inner) = split_at_axis(self.shape(), axis);
        let y = kernels::softmax(&self.view(), outer, len, inner, log)?;
        let op = if log { Op::LogSoftmax(self.clone(), axis) } else { Op::Softmax(self.clone(), axis) };
        Ok(Tensor::make(y, self.shape().to_vec(), DType::F32, Some(op)))
    }

    /// Numerically stable softmax over `axis`.
    pub fn softmax(&self, axis: usize) -> Result<Tensor> {
        self.softmax_op(axis, false)
    }
    /// Numerically stable log-softmax over `axis`.
    pub fn log_softmax(&self, axis: usize) -> Result<Tensor> {
        self.softmax_op(axis, true)
    }

    /// Matrix product. [m,k]@[k,n] -> [m,n]; [b,m,k]@[b,k,n] -> [b,m,n]; [b,m,k]@[k,n] shares the right operand.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        self.matmul_t(other, false, false)
    }

    /// Matrix product reading either operand transposed (the last two axes) without a transpose kernel.
    pub fn matmul_t(&self, other: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        self.expect_dtype("matmul", DType::F32)?;
        other.expect_dtype("matmul", DType::F32)?;
        let (a, b) = (self.shape(), other.shape());
        let ok_rank = matches!((a.len(), b.len()), (2, 2) | (3, 3) | (3, 2));
        if !ok_rank {
            return shape_err("matmul", a, b, "expects [m,k]@[k,n], [b,m,k]@[b,k,n] or [b,m,k]@[k,n]");
        }
        let mat = |s: &[usize], t: bool| {
            let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
            if t {
                (c, r)
            } else {
                (r, c)
            }
        };
        let (m, k) = mat(a, trans_a);
        let (k2, n) = mat(b, trans_b);
        if k != k2 {
            return shape_err("matmul", a, b, format!("inner dimensions {k} and {k2} differ"));
        }
        let batch = if a.len() == 3 { a[0] } else { 1 };
        if b.len() == 3 && b[0] != batch {
            return shape_err("matmul", a, b, "batch sizes differ");
        }
        let b_stride = if b.len() == 3 { k * n } else { 0 };
        let y = kernels::matmul(&self.view(), &other.view(), batch, m, n, k, m * k, b_stride, trans_a, trans_b)?;
        let shape = if a.len() == 3 { vec![batch, m, n] } else { vec![m, n] };
        Ok(Tensor::make(y, shape, DType::F32, Some(Op::Matmul(self.clone(), other.clone(), trans_a, trans_b))))
    }
}

/// x [n, c, ...] as the [n, c, inner] a fused batch norm works on.
pub(crate) fn norm_shape(op: &'static str, shape: &[usize]) -> Result<kernels::NormShape> {
    if shape.len() < 2 {
        return invalid(op, shape, "expects [n, c, ...] with the channels on axis 1");
    }
    let s = kernels::NormShape { n: shape[0], c: shape[1], inner: shape[2..].iter().product() };
    let count = s.n * s.inner;
    if count == 0 || s.c == 0 {
        return invalid(op, shape, "needs at least one value per channel");
    }
    if count > kernels::BN_FUSED_MAX_COUNT {
        return invalid(op, shape, format!("{count} values per channel exceed the fused kernels' {} (use the composite formula)", kernels::BN_FUSED_MAX_COUNT));
    }
    if s.c > 65535 {
        return invalid(op, shape, "more than 65535 channels");
    }
    Ok(s)
}
