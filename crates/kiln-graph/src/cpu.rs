//! The CPU reference: every op in plain Rust on f64, the yardstick the GPU kernels are tested against (and the
//! function finite differences are taken of).

use crate::conv::{Conv2dGeom, Pool2dGeom};
use crate::kernels::{BinaryKind, UnaryKind};
use crate::shape::{broadcast_shapes, broadcast_strides, numel, split_at_axis, strides};

#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

fn sigmoid(v: f64) -> f64 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

pub fn unary_scalar(kind: UnaryKind, v: f64, a: f64, b: f64) -> f64 {
    use UnaryKind as U;
    match kind {
        U::Neg => -v,
        U::Exp => v.exp(),
        U::Log => v.ln(),
        U::Sqrt => v.sqrt(),
        U::Abs => v.abs(),
        U::Sigmoid => sigmoid(v),
        U::Tanh => v.tanh(),
        U::Relu => v.max(0.0),
        U::LeakyRelu => {
            if v > 0.0 {
                v
            } else {
                a * v
            }
        }
        U::Softplus => v.max(0.0) + (1.0 + (-v.abs()).exp()).ln(),
        U::Clamp => v.clamp(a, b),
        U::Powf => {
            let odd_int = a.fract() == 0.0 && (a * 0.5).fract() != 0.0;
            v.abs().powf(a) * if odd_int { v.signum() } else { 1.0 }
        }
        U::Affine => a * v + b,
        U::Step => (v > 0.0) as u8 as f64,
        U::Sign => {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        U::LeakyStep => {
            if v > 0.0 {
                1.0
            } else {
                a
            }
        }
        U::InRange => (v >= a && v <= b) as u8 as f64,
        U::Fill => a,
        U::Erf => erf(v),
    }
}

/// The error function in f64: its Taylor series where it converges quickly, 1 beyond (|erf(5)| is 1 - 1.5e-12).
pub fn erf(x: f64) -> f64 {
    if x.abs() >= 5.0 {
        return x.signum();
    }
    let (mut term, mut sum, x2) = (x, x, x * x);
    for n in 1..200 {
        term *= -x2 / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 * sum.abs() {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

pub fn binary_scalar(kind: BinaryKind, x: f64, y: f64) -> f64 {
    match kind {
        BinaryKind::Add => x + y,
        BinaryKind::Sub => x - y,
        BinaryKind::Mul => x * y,
        BinaryKind::Div => x / y,
        BinaryKind::Maximum => x.max(y),
        BinaryKind::Minimum => x.min(y),
        BinaryKind::Eq => (x == y) as u8 as f64,
        BinaryKind::Gt => (x > y) as u8 as f64,
    }
}

/// Visits every index of `shape` in row-major order with the flat offsets given by two stride sets.
fn for_each_index(shape: &[usize], sa: &[usize], sb: &[usize], mut f: impl FnMut(usize, usize)) {
    let n = numel(shape);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let oa: usize = idx.iter().zip(sa).map(|(i, s)| i * s).sum();
        let ob: usize = idx.iter().zip(sb).map(|(i, s)| i * s).sum();
        f(oa, ob);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

impl CpuTensor {
    /// Layer normalisation over the last `weight.shape.len()` axes (biased variance), then `* weight + bias`.
    pub fn layer_norm(&self, weight: &CpuTensor, bias: &CpuTensor, eps: f64) -> CpuTensor {
        let d = weight.data.len().max(1);
        let mut out = self.data.clone();
        for row in out.chunks_mut(d) {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) / (var + eps).sqrt() * weight.data[j] + bias.data[j];
            }
        }
        CpuTensor::new(out, &self.shape)
    }

    pub fn new(data: Vec<f64>, shape: &[usize]) -> CpuTensor {
        assert_eq!(data.len(), numel(shape), "CpuTensor data does not fill shape {shape:?}");
        CpuTensor { shape: shape.to_vec(), data }
    }
    pub fn from_f32(data: &[f32], shape: &[usize]) -> CpuTensor {
        CpuTensor::new(data.iter().map(|&v| v as f64).collect(), shape)
    }
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    pub fn unary(&self, kind: UnaryKind, a: f64, b: f64) -> CpuTensor {
        CpuTensor::new(self.data.iter().map(|&v| unary_scalar(kind, v, a, b)).collect(), &self.shape)
    }

    pub fn binary(&self, kind: BinaryKind, other: &CpuTensor) -> CpuTensor {
        let shape = broadcast_shapes(&self.shape, &other.shape).expect("CPU reference: shapes not broadcastable");
        let (sa, sb) = (broadcast_strides(&self.shape, &shape), broadcast_strides(&other.shape, &shape));
        let mut out = Vec::with_capacity(numel(&shape));
        for_each_index(&shape, &sa, &sb, |ia, ib| out.push(binary_scalar(kind, self.data[ia], other.data[ib])));
        CpuTensor::new(out, &shape)
    }

    /// Sum (times scale) or max over one axis, kept as size 1.
    pub fn reduce(&self, axis: usize, max: bool, scale: f64) -> CpuTensor {
        let (outer, len, inner) = split_at_axis(&self.shape, axis);
        let mut out = vec![0.0; outer * inner];
        for o in 0..outer {
            for i in 0..inner {
                let vals = (0..len).map(|a| self.data[(o * len + a) * inner + i]);
                out[o * inner + i] = if max { vals.fold(f64::NEG_INFINITY, f64::max) } else { vals.sum::<f64>() * scale };
            }
        }
        let mut shape = self.shape.clone();
        shape[axis] = 1;
        CpuTensor::new(out, &shape)
    }

    pub fn reshape(&self, shape: &[usize]) -> CpuTensor {
        CpuTensor::new(self.data.clone(), shape)
    }

    pub fn permute(&self, perm: &[usize]) -> CpuTensor {
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let st = strides(&self.shape);
        let src: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let mut out = Vec::with_capacity(self.data.len());
        for_each_index(&shape, &src, &src, |i, _| out.push(self.data[i]));
        CpuTensor::new(out, &shape)
    }

    pub fn broadcast_to(&self, shape: &[usize]) -> CpuTensor {
        let s = broadcast_strides(&self.shape, shape);
        let mut out = Vec::with_capacity(numel(shape));
        for_each_index(shape, &s, &s, |i, _| out.push(self.data[i]));
        CpuTensor::new(out, shape)
    }

    pub fn slice(&self, axis: usize, start: usize, len: usize) -> CpuTensor {
        let (outer, full, inner) = split_at_axis(&self.shape, axis);
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            out.extend_from_slice(&self.data[(o * full + start) * inner..(o * full + start + len) * inner]);
        }
        let mut shape = self.shape.clone();
        shape[axis] = len;
        CpuTensor::new(out, &shape)
    }

    pub fn concat(xs: &[&CpuTensor], axis: usize) -> CpuTensor {
        let mut shape = xs[0].shape.clone();
        shape[axis] = xs.iter().map(|x| x.shape[axis]).sum();
        let (outer, _, inner) = split_at_axis(&shape, axis);
        let mut out = Vec::with_capacity(numel(&shape));
        for o in 0..outer {
            for x in xs {
                let chunk = x.shape[axis] * inner;
                out.extend_from_slice(&x.data[o * chunk..(o + 1) * chunk]);
            }
        }
        CpuTensor::new(out, &shape)
    }

    pub fn index_select(&self, axis: usize, idx: &[u32]) -> CpuTensor {
        let (outer, len, inner) = split_at_axis(&self.shape, axis);
        let mut out = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &r in idx {
                let r = r as usize;
                if r < len {
                    out.extend_from_slice(&self.data[(o * len + r) * inner..(o * len + r + 1) * inner]);
                } else {
                    out.extend(std::iter::repeat_n(f64::NAN, inner));
                }
            }
        }
        let mut shape = self.shape.clone();
        shape[axis] = idx.len();
        CpuTensor::new(out, &shape)
    }

    pub fn one_hot(labels: &[u32], classes: usize) -> CpuTensor {
        let mut out = vec![0.0; labels.len() * classes];
        for (i, &l) in labels.iter().enumerate() {
            if (l as usize) < classes {
                out[i * classes + l as usize] = 1.0;
            } else {
                out[i * classes..(i + 1) * classes].fill(f64::NAN);
            }
        }
        CpuTensor::new(out, &[labels.len(), classes])
    }

    pub fn softmax(&self, axis: usize, log: bool) -> CpuTensor {
        let (outer, len, inner) = split_at_axis(&self.shape, axis);
        let mut out = self.data.clone();
        for o in 0..outer {
            for i in 0..inner {
                let at = |a: usize| (o * len + a) * inner + i;
                let m = (0..len).map(|a| self.data[at(a)]).fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = (0..len).map(|a| (self.data[at(a)] - m).exp()).sum();
                for a in 0..len {
                    out[at(a)] = if log { self.data[at(a)] - m - s.ln() } else { (self.data[at(a)] - m).exp() / s };
                }
            }
        }
        CpuTensor::new(out, &self.shape)
    }

    /// Last two axes read transposed when asked; [b,m,k]@[k,n] shares b.
    pub fn matmul_t(&self, other: &CpuTensor, ta: bool, tb: bool) -> CpuTensor {
        let (a, b) = (&self.shape, &other.shape);
        let dims = |s: &[usize], t: bool| {
            let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
            if t {
                (c, r)
            } else {
                (r, c)
            }
        };
        let ((m, k), (_, n)) = (dims(a, ta), dims(b, tb));
        let batch = if a.len() == 3 { a[0] } else { 1 };
        let b_stride = if b.len() == 3 { k * n } else { 0 };
        let mut out = vec![0.0; batch * m * n];
        for z in 0..batch {
            let (ab, bb) = (z * m * k, z * b_stride);
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for p in 0..k {
                        let av = if ta { self.data[ab + p * m + i] } else { self.data[ab + i * k + p] };
                        let bv = if tb { other.data[bb + j * k + p] } else { other.data[bb + p * n + j] };
                        acc += av * bv;
                    }
                    out[z * m * n + i * n + j] = acc;
                }
            }
        }
        let shape = if a.len() == 3 { vec![batch, m, n] } else { vec![m, n] };
        CpuTensor::new(out, &shape)
    }

    /// x [n, c_in, h, w] * weight [c_out, c_in/groups, kh, kw] -> [n, c_out, oh, ow]
    pub fn conv2d(&self, weight: &CpuTensor, g: &Conv2dGeom) -> CpuTensor {
        let (x, w) = (&self.shape, &weight.shape);
        let (oh, ow) = g.output_size(x[2], x[3], w[2], w[3]).expect("CPU reference: kernel does not fit");
        let (cig, cog) = (x[1] / g.groups, w[0] / g.groups);
        let mut out = vec![0.0; x[0] * w[0] * oh * ow];
        for b in 0..x[0] {
            for co in 0..w[0] {
                let grp = co / cog;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0.0;
                        for ci in 0..cig {
                            for ky in 0..w[2] {
                                for kx in 0..w[3] {
                                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= x[2] as isize || ix >= x[3] as isize {
                                        continue;
                                    }
                                    let xv = self.data[((b * x[1] + grp * cig + ci) * x[2] + iy as usize) * x[3] + ix as usize];
                                    acc += xv * weight.data[((co * cig + ci) * w[2] + ky) * w[3] + kx];
                                }
                            }
                        }
                        out[((b * w[0] + co) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        CpuTensor::new(out, &[x[0], w[0], oh, ow])
    }

    /// x [n, c_in, h, w] transposed-convolved with weight [c_in, c_out/groups, kh, kw] (PyTorch's
    /// conv_transpose2d): each input value scattered through the kernel, at stride steps.
    pub fn conv_transpose2d(&self, weight: &CpuTensor, g: &Conv2dGeom, output_padding: [usize; 2]) -> CpuTensor {
        let (x, w) = (&self.shape, &weight.shape);
        let (cig, cog) = (x[1] / g.groups, w[1]);
        let size = |d: usize, k: usize| (x[2 + d] - 1) * g.stride[d] + g.dilation[d] * (k - 1) + output_padding[d] + 1 - 2 * g.padding[d];
        let (oh, ow, co_all) = (size(0, w[2]), size(1, w[3]), cog * g.groups);
        let mut out = vec![0.0; x[0] * co_all * oh * ow];
        for b in 0..x[0] {
            for ci in 0..x[1] {
                let grp = ci / cig;
                for iy in 0..x[2] {
                    for ix in 0..x[3] {
                        let xv = self.data[((b * x[1] + ci) * x[2] + iy) * x[3] + ix];
                        for col in 0..cog {
                            let co = grp * cog + col;
                            for ky in 0..w[2] {
                                for kx in 0..w[3] {
                                    let oy = (iy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                                    let ox = (ix * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                                    if oy < 0 || ox < 0 || oy >= oh as isize || ox >= ow as isize {
                                        continue;
                                    }
                                    out[((b * co_all + co) * oh + oy as usize) * ow + ox as usize] += xv * weight.data[((ci * cog + col) * w[2] + ky) * w[3] + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        CpuTensor::new(out, &[x[0], co_all, oh, ow])
    }

    /// Max (or average, divisor kh*kw) pooling of [n, c, h, w].
    pub fn pool2d(&self, g: &Pool2dGeom, max: bool) -> CpuTensor {
        let x = &self.shape;
        let (oh, ow) = g.output_size(x[2], x[3]).expect("CPU reference: window does not fit");
        let mut out = Vec::with_capacity(x[0] * x[1] * oh * ow);
        for plane in 0..x[0] * x[1] {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = if max { f64::NEG_INFINITY } else { 0.0 };
                    for ky in 0..g.kernel[0] {
                        for kx in 0..g.kernel[1] {
                            let iy = (oy * g.stride[0] + ky) as isize - g.padding[0] as isize;
                            let ix = (ox * g.stride[1] + kx) as isize - g.padding[1] as isize;
                            if iy < 0 || ix < 0 || iy >= x[2] as isize || ix >= x[3] as isize {
                                continue;
                            }
                            let v = self.data[(plane * x[2] + iy as usize) * x[3] + ix as usize];
                            acc = if max { acc.max(v) } else { acc + v };
                        }
                    }
                    out.push(if max { acc } else { acc / (g.kernel[0] * g.kernel[1]) as f64 });
                }
            }
        }
        CpuTensor::new(out, &[x[0], x[1], oh, ow])
    }

    pub fn sum_all(&self) -> f64 {
        self.data.iter().sum()
    }

    pub fn mse(&self, target: &CpuTensor) -> f64 {
        self.data.iter().zip(&target.data).map(|(p, t)| (p - t) * (p - t)).sum::<f64>() / self.data.len() as f64
    }

    pub fn bce_with_logits(&self, target: &CpuTensor) -> f64 {
        let per = self.data.iter().zip(&target.data).map(|(&x, &y)| x.max(0.0) - x * y + (1.0 + (-x.abs()).exp()).ln());
        per.sum::<f64>() / self.data.len() as f64
    }

    pub fn cross_entropy(&self, labels: &[u32]) -> f64 {
        let classes = self.shape[1];
        let logp = self.softmax(1, true);
        -labels.iter().enumerate().map(|(i, &l)| logp.data.get(i * classes + l as usize).copied().filter(|_| (l as usize) < classes).unwrap_or(f64::NAN)).sum::<f64>() / labels.len() as f64
    }
}

/// The reference of `rnn::rnn_sequence`: one layer and direction of a recurrent net over T steps. xg [T * n,
/// G * H] (every step's x W_ih^T + b_ih), w_hh [G * H, H], b_hh [G * H], h0 and c0 (an LSTM's) [n, H]; past
/// `lengths[i]` steps sequence i's state is held. Returns the h of every step in time order [T, n, H], the
/// final h and, for an LSTM, the final c, each [n, H].
#[allow(clippy::too_many_arguments)]
pub fn rnn_sequence(
    kind: crate::rnn::CellKind,
    xg: &CpuTensor,
    w_hh: &CpuTensor,
    b_hh: &CpuTensor,
    h0: &CpuTensor,
    c0: Option<&CpuTensor>,
    lengths: Option<&[usize]>,
    reverse: bool,
) -> (CpuTensor, CpuTensor, Option<CpuTensor>) {
    use crate::rnn::CellKind;
    let (n, hidden) = (h0.shape[0], h0.shape[1]);
    let gh = kind.gates() * hidden;
    let steps = xg.shape[0] / n;
    let (mut h, mut c) = (h0.data.clone(), c0.map(|c| c.data.clone()).unwrap_or_else(|| vec![0.0; n * hidden]));
    let mut out = vec![0.0; steps * n * hidden];
    let order: Vec<usize> = if reverse { (0..steps).rev().collect() } else { (0..steps).collect() };
    for t in order {
        for s in 0..n {
            if lengths.is_some_and(|l| t >= l[s]) {
                out[(t * n + s) * hidden..(t * n + s + 1) * hidden].copy_from_slice(&h[s * hidden..(s + 1) * hidden]);
                continue;
            }
            let xp = &xg.data[(t * n + s) * gh..(t * n + s + 1) * gh];
            let hp: Vec<f64> = (0..gh).map(|r| b_hh.data[r] + (0..hidden).map(|k| w_hh.data[r * hidden + k] * h[s * hidden + k]).sum::<f64>()).collect();
            let mut h2 = vec![0.0; hidden];
            for j in 0..hidden {
                let at = s * hidden + j;
                match kind {
                    CellKind::Tanh => h2[j] = (xp[j] + hp[j]).tanh(),
                    CellKind::Lstm => {
                        let gate = |k: usize| xp[k * hidden + j] + hp[k * hidden + j];
                        let (i, f, g, o) = (sigmoid(gate(0)), sigmoid(gate(1)), gate(2).tanh(), sigmoid(gate(3)));
                        c[at] = f * c[at] + i * g;
                        h2[j] = o * c[at].tanh();
                    }
                    CellKind::Gru => {
                        let r = sigmoid(xp[j] + hp[j]);
                        let z = sigmoid(xp[hidden + j] + hp[hidden + j]);
                        let nn = (xp[2 * hidden + j] + r * hp[2 * hidden + j]).tanh();
                        h2[j] = (1.0 - z) * nn + z * h[at];
                    }
                }
            }
            h[s * hidden..(s + 1) * hidden].copy_from_slice(&h2);
            out[(t * n + s) * hidden..(t * n + s + 1) * hidden].copy_from_slice(&h2);
        }
    }
    let c_last = (kind == CellKind::Lstm).then(|| CpuTensor::new(c, &[n, hidden]));
    (CpuTensor::new(out, &[steps, n, hidden]), CpuTensor::new(h, &[n, hidden]), c_last)
}

/// The reference of `attention::attention`: softmax(q k^T * scale + mask) v per batch row, causal keys hidden,
/// `mask` [tq, tk] or [b, tq, tk] added, and with `dropout` = (p, seed) each probability times
/// `attention::dropout_factor`. q [b, tq, d], k [b, tk, d], v [b, tk, dv].
pub fn attention(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, mask: Option<&CpuTensor>, causal: bool, scale: f64, dropout: Option<(f32, u64)>) -> CpuTensor {
    let (b, tq, d) = (q.shape[0], q.shape[1], q.shape[2]);
    let (tk, dv) = (k.shape[1], v.shape[2]);
    let mut out = vec![0.0; b * tq * dv];
    for bi in 0..b {
        for i in 0..tq {
            let scores: Vec<f64> = (0..tk)
                .map(|j| {
                    let dot: f64 = (0..d).map(|c| q.data[(bi * tq + i) * d + c] * k.data[(bi * tk + j) * d + c]).sum();
                    let hidden = if causal && j > i { f64::NEG_INFINITY } else { 0.0 };
                    let m = mask.map(|m| if m.shape.len() == 3 { m.data[(bi * tq + i) * tk + j] } else { m.data[i * tk + j] }).unwrap_or(0.0);
                    dot * scale + hidden + m
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = w.iter().sum();
            for c in 0..dv {
                out[(bi * tq + i) * dv + c] = (0..tk)
                    .map(|j| {
                        let keep = dropout.map(|(p, seed)| crate::attention::dropout_factor(p, seed, bi, tq, i, j) as f64).unwrap_or(1.0);
                        w[j] / z * keep * v.data[(bi * tk + j) * dv + c]
                    })
                    .sum();
            }
        }
    }
    CpuTensor::new(out, &[b, tq, dv])
}

/// torchvision's `roi_align` in f64 (the reference for vision.rs): x [n, c, h, w], `rois` k rows of (batch
/// index, x1, y1, x2, y2) -> [k, c, ph, pw].
pub fn roi_align(x: &CpuTensor, rois: &[f64], geom: &crate::vision::RoiAlignGeom) -> CpuTensor {
    let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let [ph, pw] = geom.output_size;
    let k = rois.len() / 5;
    let scale = geom.spatial_scale as f64;
    let mut y = vec![0.0; k * c * ph * pw];
    let bilinear = |plane: &[f64], y: f64, x: f64| -> f64 {
        if y < -1.0 || y > h as f64 || x < -1.0 || x > w as f64 {
            return 0.0;
        }
        let (mut y, mut x) = (y.max(0.0), x.max(0.0));
        let (mut yl, mut xl) = (y as usize, x as usize);
        let (yh, xh);
        if yl >= h - 1 {
            yl = h - 1;
            yh = yl;
            y = yl as f64;
        } else {
            yh = yl + 1;
        }
        if xl >= w - 1 {
            xl = w - 1;
            xh = xl;
            x = xl as f64;
        } else {
            xh = xl + 1;
        }
        let (ly, lx) = (y - yl as f64, x - xl as f64);
        let (hy, hx) = (1.0 - ly, 1.0 - lx);
        hy * hx * plane[yl * w + xl] + hy * lx * plane[yl * w + xh] + ly * hx * plane[yh * w + xl] + ly * lx * plane[yh * w + xh]
    };
    for r in 0..k {
        let roi = &rois[5 * r..5 * r + 5];
        let b = roi[0];
        if !(b >= 0.0 && b < n as f64) {
            continue;
        }
        let off = if geom.aligned { 0.5 } else { 0.0 };
        let (x0, y0) = (roi[1] * scale - off, roi[2] * scale - off);
        let (mut rw, mut rh) = (roi[3] * scale - off - x0, roi[4] * scale - off - y0);
        if !geom.aligned {
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let (bh, bw) = (rh / ph as f64, rw / pw as f64);
        let grid = |size: f64, out: usize| if geom.sampling_ratio > 0 { geom.sampling_ratio as usize } else { (size / out as f64).ceil().max(0.0) as usize };
        let (gh, gw) = (grid(rh, ph), grid(rw, pw));
        let count = (gh * gw).max(1) as f64;
        for ch in 0..c {
            let plane = &x.data[((b as usize) * c + ch) * h * w..][..h * w];
            for py in 0..ph {
                for px in 0..pw {
                    let mut acc = 0.0;
                    for iy in 0..gh {
                        let yy = y0 + py as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                        for ix in 0..gw {
                            let xx = x0 + px as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                            acc += bilinear(plane, yy, xx);
                        }
                    }
                    y[((r * c + ch) * ph + py) * pw + px] = acc / count;
                }
            }
        }
    }
    CpuTensor { shape: vec![k, c, ph, pw], data: y }
}

/// IoU and generalized IoU of every pair of boxes (x1, y1, x2, y2) in f64: ([n * m], [n * m]).
pub fn box_iou_giou(a: &[[f64; 4]], b: &[[f64; 4]]) -> (Vec<f64>, Vec<f64>) {
    let (mut iou, mut giou) = (Vec::new(), Vec::new());
    for p in a {
        for q in b {
            let (inter, union) = intersection_union(p, q);
            let hull = (p[2].max(q[2]) - p[0].min(q[0])).max(0.0) * (p[3].max(q[3]) - p[1].min(q[1])).max(0.0);
            iou.push(inter / union);
            giou.push(inter / union - (hull - union) / hull);
        }
    }
    (iou, giou)
}

/// Two boxes' (intersection, union) areas.
fn intersection_union(p: &[f64; 4], q: &[f64; 4]) -> (f64, f64) {
    let area = |r: &[f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let inter = (p[2].min(q[2]) - p[0].max(q[0])).max(0.0) * (p[3].min(q[3]) - p[1].max(q[1])).max(0.0);
    (inter, area(p) + area(q) - inter)
}

/// torchvision's BoxCoder in f64: (encode(reference, proposals), decode(deltas, boxes)) row by row.
pub fn box_encode(reference: &[f64; 4], proposal: &[f64; 4], weights: [f64; 4]) -> [f64; 4] {
    let c = |b: &[f64; 4]| [b[0] + 0.5 * (b[2] - b[0]), b[1] + 0.5 * (b[3] - b[1]), b[2] - b[0], b[3] - b[1]];
    let (g, p) = (c(reference), c(proposal));
    [weights[0] * (g[0] - p[0]) / p[2], weights[1] * (g[1] - p[1]) / p[3], weights[2] * (g[2] / p[2]).ln(), weights[3] * (g[3] / p[3]).ln()]
}

/// The box `deltas` make of `boxes` (torchvision's `decode_single`, dw and dh clamped at `clip`).
pub fn box_decode(delta: &[f64; 4], b: &[f64; 4], weights: [f64; 4], clip: f64) -> [f64; 4] {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let (cx, cy) = (b[0] + 0.5 * w, b[1] + 0.5 * h);
    let (x, y) = (delta[0] / weights[0] * w + cx, delta[1] / weights[1] * h + cy);
    let (pw, ph) = ((delta[2] / weights[2]).min(clip).exp() * w, (delta[3] / weights[3]).min(clip).exp() * h);
    [x - 0.5 * pw, y - 0.5 * ph, x + 0.5 * pw, y + 0.5 * ph]
}

/// Greedy NMS in f64 (the reference for vision::nms_fixed): indices of the kept boxes by descending score
/// (ties by index); candidates score above `score_threshold` (NaN never; NEG_INFINITY: every other score,
/// -inf included); a kept box suppresses later boxes
/// (of its class, with `classes`) whose IoU with it is above `iou` (or equal, with `inclusive`).
pub fn nms(boxes: &[[f64; 4]], scores: &[f64], classes: Option<&[u32]>, iou: f64, score_threshold: f64, max_keep: usize, inclusive: bool) -> Vec<u32> {
    let mut order: Vec<usize> = (0..boxes.len()).filter(|&i| !scores[i].is_nan() && (score_threshold == f64::NEG_INFINITY || scores[i] > score_threshold)).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).expect("candidates are not NaN").then(a.cmp(&b)));
    let mut removed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if removed[i] || keep.len() >= max_keep {
            continue;
        }
        keep.push(i as u32);
        for &j in &order[pos + 1..] {
            if removed[j] || classes.is_some_and(|c| c[i] != c[j]) {
                continue;
            }
            let (inter, union) = intersection_union(&boxes[i], &boxes[j]);
            let v = inter / union;
            if v > iou || (inclusive && v == iou) {
                removed[j] = true;
            }
        }
    }
    keep
}
