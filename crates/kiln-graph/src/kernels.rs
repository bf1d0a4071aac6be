//! Raw kernel launchers: one function per WGSL entry point, on pooled buffers, no autograd. Ops (ops.rs) and
//! the optimizers (kiln-nn) call these; nothing above kiln-graph touches wgpu.

use kiln_wgpu::{grid_1d, BufView, Dispatch, Gpu, Shader, TexView};

use crate::error::{invalid, Result};

macro_rules! shader {
    ($name:ident, $file:literal) => {
        // SAFETY: Kiln's shaders step every loop by a positive constant (or halve a positive stride) towards a
        // bound from their params; tests run each on the sizes the launchers split work into.
        pub static $name: Shader = unsafe { Shader::trusted($file, include_str!(concat!("../../../shaders/", $file))) };
    };
}
// elementwise.wgsl and norm.wgsl share the fused activations (activation.wgsl).
// SAFETY (here and below): as for `shader!`.
pub static ELEMENTWISE: Shader = unsafe {
    Shader::trusted("elementwise.wgsl", concat!(include_str!("../../../shaders/texel.wgsl"), include_str!("../../../shaders/activation.wgsl"), include_str!("../../../shaders/elementwise.wgsl")))
};
shader!(LAYOUT, "layout.wgsl");
shader!(REDUCE, "reduce.wgsl");
shader!(SOFTMAX, "softmax.wgsl");
// The two matmul files share their params, bindings and accessors (matmul_common.wgsl).
pub static MATMUL: Shader = unsafe { Shader::trusted("matmul.wgsl", concat!(include_str!("../../../shaders/matmul_common.wgsl"), include_str!("../../../shaders/matmul.wgsl"))) };
pub static MATMUL_SUBGROUP: Shader =
    unsafe { Shader::trusted("matmul_subgroup.wgsl", concat!(include_str!("../../../shaders/matmul_common.wgsl"), include_str!("../../../shaders/matmul_subgroup.wgsl"))) };
shader!(ROOF, "roof.wgsl");
shader!(INDEX, "index.wgsl");
pub static OPTIM: Shader = unsafe { Shader::trusted("optim.wgsl", concat!(include_str!("../../../shaders/texel.wgsl"), include_str!("../../../shaders/optim.wgsl"))) };
shader!(CONV2D, "conv2d.wgsl");
shader!(POOL, "pool.wgsl");
shader!(AUGMENT, "augment.wgsl");
shader!(ANOMALY, "anomaly.wgsl");
shader!(EMBEDDING, "embedding.wgsl");
shader!(RECURRENT, "recurrent.wgsl");
shader!(ATTENTION, "attention.wgsl");
shader!(ROI, "roi.wgsl");
shader!(NMS, "nms.wgsl");
pub static NORM: Shader = unsafe { Shader::trusted("norm.wgsl", concat!(include_str!("../../../shaders/activation.wgsl"), include_str!("../../../shaders/norm.wgsl"))) };

/// Every shader file, for tests that compile them all.
pub static ALL_SHADERS: [&Shader; 18] =
    [&NMS, &ELEMENTWISE, &LAYOUT, &REDUCE, &SOFTMAX, &MATMUL, &INDEX, &OPTIM, &CONV2D, &POOL, &AUGMENT, &ROOF, &NORM, &ANOMALY, &EMBEDDING, &RECURRENT, &ATTENTION, &ROI];
/// Shaders that need Features::SUBGROUP.
pub static SUBGROUP_SHADERS: [&Shader; 1] = [&MATMUL_SUBGROUP];

const WG: u32 = 256;

/// Little-endian bytes of a WGSL params struct, field by field.
#[derive(Default)]
pub struct Params(Vec<u8>);

impl Params {
    pub fn new() -> Params {
        Params(Vec::with_capacity(112))
    }
    pub fn u32(mut self, v: usize) -> Params {
        self.0.extend_from_slice(&(v as u32).to_le_bytes());
        self
    }
    pub fn f32(mut self, v: f32) -> Params {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// An `array<vec4<u32>, 2>`: up to 8 dims, zero-padded.
    pub fn dims8(mut self, v: &[usize]) -> Params {
        for i in 0..8 {
            self = self.u32(v.get(i).copied().unwrap_or(0));
        }
        self
    }
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
    /// Overwrites field `index` (counting 4-byte fields from 0) with a u32.
    pub fn set_u32(&mut self, index: usize, v: usize) {
        self.0[4 * index..4 * index + 4].copy_from_slice(&(v as u32).to_le_bytes());
    }
}

pub const MAX_RANK: usize = 8;

fn check_u32(op: &'static str, shape: &[usize]) -> Result<()> {
    if crate::shape::numel(shape) > u32::MAX as usize {
        return invalid(op, shape, "more than 2^32 elements cannot be indexed by the kernels");
    }
    if shape.len() > MAX_RANK {
        return invalid(op, shape, format!("rank above {MAX_RANK} is not supported"));
    }
    Ok(())
}

/// A fresh buffer of `n` floats on `like`'s device.
pub(crate) fn out_buffer(like: &BufView, n: usize, what: &str) -> Result<BufView> {
    out(like, n, what)
}

fn out(like: &BufView, n: usize, what: &str) -> Result<BufView> {
    Ok(like.device().alloc(4 * n.max(1) as u64, what)?)
}

/// A per-device switch: the device's own setting if set, else the process default from the environment
/// variable `env` ("on"/"off"), else `None` (auto).
fn switch(dev: &Gpu, key: &'static str, env: &'static std::sync::OnceLock<Option<bool>>, env_name: &str) -> Option<bool> {
    match dev.setting(key) {
        Some(v) => Some(v != 0),
        None => *env.get_or_init(|| match std::env::var(env_name).as_deref() {
            Ok("on") | Ok("1") | Ok("implicit") => Some(true),
            Ok("off") | Ok("0") | Ok("im2col") => Some(false),
            _ => None,
        }),
    }
}

pub(crate) fn launch(shader: &'static Shader, entry: &'static str, constants: &[(&'static str, f64)], params: Params, inputs: &[&BufView], outputs: &[&BufView], workgroups: [u32; 3]) -> Result<()> {
    launch_textured(shader, entry, constants, params, inputs, outputs, &[], workgroups)
}

/// `launch` with texture copies of some operands bound after the outputs.
#[allow(clippy::too_many_arguments)]
fn launch_textured(
    shader: &'static Shader,
    entry: &'static str,
    constants: &[(&'static str, f64)],
    params: Params,
    inputs: &[&BufView],
    outputs: &[&BufView],
    textures: &[&TexView],
    workgroups: [u32; 3],
) -> Result<()> {
    // Every kernel writes an output; the device checks that every binding is its own.
    let dev = outputs.first().or(inputs.first()).ok_or_else(|| crate::error::KilnError::Usage(format!("kernel {entry} launched without buffers")))?.device();
    dev.dispatch(&Dispatch { shader, entry, constants, params: params.bytes(), inputs, outputs, textures, workgroups })?;
    Ok(())
}

/// Unary op codes of elementwise.wgsl.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryKind {
    Neg = 0,
    Exp = 1,
    Log = 2,
    Sqrt = 3,
    Abs = 4,
    Sigmoid = 5,
    Tanh = 6,
    Relu = 7,
    LeakyRelu = 8,
    Softplus = 9,
    Clamp = 10,
    Powf = 11,
    Affine = 12,
    Step = 13,
    Sign = 14,
    LeakyStep = 15,
    InRange = 16,
    Fill = 17,
    Erf = 18,
}

/// Binary op codes of elementwise.wgsl.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryKind {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
    Maximum = 4,
    Minimum = 5,
    Eq = 6,
    Gt = 7,
}

/// y = f(x; alpha, beta), x: [n]
pub fn unary(kind: UnaryKind, x: &BufView, n: usize, alpha: f32, beta: f32) -> Result<BufView> {
    let y = out(x, n, "unary output")?;
    let p = Params::new().u32(n).u32(0).f32(alpha).f32(beta);
    launch(&ELEMENTWISE, "unary", &[("OP", kind as u32 as f64)], p, &[x], &[&y], grid_1d(n as u64, WG))?;
    Ok(y)
}

/// The activation a fused kernel applies (`bias_act`, `batch_norm`; activation.wgsl's ACT codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BiasAct {
    Identity = 0,
    Relu = 1,
    Sigmoid = 2,
    Tanh = 3,
}

static TEXTURE_READS_ENV: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();

/// Forces (Some) or restores the default (None) of `texture_reads` on one device (the process default is
/// `KILN_TEXTURES=on|off`): tests run the kernels both ways.
pub fn set_texture_reads(dev: &Gpu, on: Option<bool>) {
    dev.set_setting("texture_reads", on.map(u8::from));
}

/// Whether the fused elementwise kernels and Adam read texture copies of their inputs (texel.wgsl): by default
/// on CPU adapters (lavapipe), where that is several times faster than reading storage buffers, copies
/// included (docs/how-it-runs.md).
pub fn texture_reads(dev: &Gpu) -> Result<bool> {
    Ok(switch(dev, "texture_reads", &TEXTURE_READS_ENV, "KILN_TEXTURES").unwrap_or(dev.info.device_type == kiln_wgpu::wgpu::DeviceType::Cpu))
}

/// A fresh output bound as whole 16-byte texels for vec4 stores (the last one's spare lanes fall in the
/// buffer's unused room), if the buffer has the room.
fn vec4_binding(fresh: &BufView) -> Option<BufView> {
    let bytes = fresh.bytes.div_ceil(16) * 16;
    (fresh.offset.is_multiple_of(16) && fresh.offset + bytes <= fresh.buffer.capacity()).then(|| BufView { bytes, ..fresh.clone() })
}

/// y = act(x + bias[channel]) for x viewed as [outer, channels, inner].
pub fn bias_act(x: &BufView, bias: &BufView, n: usize, channels: usize, inner: usize, act: BiasAct) -> Result<BufView> {
    let y = out(x, n, "bias_act output")?;
    let p = Params::new().u32(n).u32(channels).u32(inner.max(1)).u32(0);
    let consts = [("ACT", act as u32 as f64)];
    if let (true, Some(y4)) = (texture_reads(x.device())?, vec4_binding(&y)) {
        let (xt, bt) = (texture_copy(x, "bias_act input")?.0, texture_copy(bias, "bias")?.0);
        launch_textured(&ELEMENTWISE, "bias_act_forward4", &consts, p, &[], &[&y4], &[&xt, &bt], grid_1d(n.div_ceil(4) as u64, WG))?;
    } else {
        launch(&ELEMENTWISE, "bias_act_forward", &consts, p, &[x, bias], &[&y], grid_1d(n as u64, WG))?;
    }
    Ok(y)
}

/// g_pre = g * act'(pre), from y = act(pre).
pub fn act_backward(g: &BufView, y: &BufView, n: usize, act: BiasAct) -> Result<BufView> {
    let gp = out(g, n, "activation gradient")?;
    let p = Params::new().u32(n).u32(1).u32(1).u32(0);
    let consts = [("ACT", act as u32 as f64)];
    if let (true, Some(gp4)) = (texture_reads(g.device())?, vec4_binding(&gp)) {
        let (gt, yt) = (texture_copy(g, "activation gradient input")?.0, texture_copy(y, "activation output")?.0);
        launch_textured(&ELEMENTWISE, "act_backward4", &consts, p, &[], &[&gp4], &[&gt, &yt], grid_1d(n.div_ceil(4) as u64, WG))?;
    } else {
        launch(&ELEMENTWISE, "act_backward", &consts, p, &[g, y], &[&gp], grid_1d(n as u64, WG))?;
    }
    Ok(gp)
}

/// Per-channel counts above this run batch norm as the composite formula: the fused kernels' per-channel
/// loops must stay under lavapipe's 65535-iteration cap (two passes of count / 256 iterations per lane).
pub const BN_FUSED_MAX_COUNT: usize = 1 << 21;

/// The geometry of a fused batch norm: x viewed as [n, c, inner].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NormShape {
    pub n: usize,
    pub c: usize,
    pub inner: usize,
}

impl NormShape {
    fn params(&self, eps: f32, momentum: f32) -> Params {
        // A power of two lanes along `inner` (at most a workgroup), the rest along n (see norm.wgsl).
        let lanes_inner = self.inner.next_power_of_two().min(WG as usize);
        Params::new().u32(self.n).u32(self.c).u32(self.inner).u32(lanes_inner).f32(eps).f32(momentum).u32(self.n * self.c * self.inner).u32(0)
    }
    fn total(&self) -> usize {
        self.n * self.c * self.inner
    }
}

/// stats [3, c]: per-channel mean, 1 / sqrt(var + eps) and the biased variance of x.
pub fn bn_stats(x: &BufView, s: NormShape, eps: f32) -> Result<BufView> {
    let stats = out(x, 3 * s.c, "batch norm statistics")?;
    launch(&NORM, "bn_stats", &[], s.params(eps, 0.0), &[x], &[&stats], [s.c as u32, 1, 1])?;
    Ok(stats)
}

/// y = act((x - mean) * inv_std * gamma + beta), per channel.
pub fn bn_apply(x: &BufView, stats: &BufView, gamma: &BufView, beta: &BufView, s: NormShape, act: BiasAct) -> Result<BufView> {
    let y = out(x, s.total(), "batch norm output")?;
    launch(&NORM, "bn_apply", &[("ACT", act as u32 as f64)], s.params(0.0, 0.0), &[x, stats, gamma, beta], &[&y], grid_1d(s.total() as u64, WG))?;
    Ok(y)
}

/// Layer norm over the last axis of x [rows, d] (norm.wgsl's ln_forward): (y, stats [rows, 2] = mean, rstd).
pub fn ln_forward(x: &BufView, w: &BufView, b: &BufView, rows: usize, d: usize, eps: f32) -> Result<(BufView, BufView)> {
    let y = out(x, rows * d, "layer norm output")?;
    let stats = out(x, 2 * rows, "layer norm statistics")?;
    let p = Params::new().u32(rows).u32(d).f32(eps).u32(0);
    launch(&NORM, "ln_forward", &[], p, &[x, w, b], &[&y, &stats], grid_1d(rows as u64, 64))?;
    Ok((y, stats))
}

/// Layer norm's backward (ln_backward): (dx [rows, d], g * xhat [rows, d], summed over rows by the caller for
/// the weight's gradient).
pub fn ln_backward(g: &BufView, x: &BufView, w: &BufView, stats: &BufView, rows: usize, d: usize) -> Result<(BufView, BufView)> {
    let dx = out(x, rows * d, "layer norm input gradient")?;
    let gxhat = out(x, rows * d, "layer norm weight gradient terms")?;
    let p = Params::new().u32(rows).u32(d).f32(0.0).u32(0);
    launch(&NORM, "ln_backward", &[], p, &[g, x, w, stats], &[&dx, &gxhat], grid_1d(rows as u64, 64))?;
    Ok((dx, gxhat))
}

/// (g_beta, g_gamma) [c] each: sums of g_pre and g_pre * xhat per channel, with g_pre = g * act'(y).
pub fn bn_backward_reduce(g: &BufView, y: &BufView, x: &BufView, stats: &BufView, s: NormShape, act: BiasAct) -> Result<(BufView, BufView)> {
    let g_beta = out(g, s.c, "batch norm beta gradient")?;
    let g_gamma = out(g, s.c, "batch norm gamma gradient")?;
    launch(&NORM, "bn_backward_reduce", &[("ACT", act as u32 as f64)], s.params(0.0, 0.0), &[g, y, x, stats], &[&g_beta, &g_gamma], [s.c as u32, 1, 1])?;
    Ok((g_beta, g_gamma))
}

/// dx of a training-mode batch norm, from the sums of `bn_backward_reduce`.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_apply(g: &BufView, y: &BufView, x: &BufView, stats: &BufView, gamma: &BufView, g_beta: &BufView, g_gamma: &BufView, s: NormShape, act: BiasAct) -> Result<BufView> {
    let dx = out(g, s.total(), "batch norm input gradient")?;
    launch(&NORM, "bn_backward_apply", &[("ACT", act as u32 as f64)], s.params(0.0, 0.0), &[g, y, x, stats, gamma, g_beta, g_gamma], &[&dx], grid_1d(s.total() as u64, WG))?;
    Ok(dx)
}

/// running_mean, running_var (in place) = (1 - momentum) * running + momentum * the batch's mean and unbiased
/// variance.
pub fn bn_running_update(stats: &BufView, running_mean: &BufView, running_var: &BufView, s: NormShape, momentum: f32) -> Result<()> {
    launch(&NORM, "bn_running_update", &[], s.params(0.0, momentum), &[stats], &[running_mean, running_var], grid_1d(s.c as u64, WG))
}

/// y[i] ~ U[0, 1), a hash of (seed, offset + i): reproducible for a seed whatever the dispatch shape.
pub fn random_uniform(dev: &Gpu, n: usize, seed: u64, offset: u32) -> Result<BufView> {
    let y = dev.alloc(4 * n.max(1) as u64, "random numbers")?;
    let p = Params::new().u32(n).u32((seed & 0xffff_ffff) as usize).u32((seed >> 32) as usize).u32(offset as usize);
    launch(&ELEMENTWISE, "random_uniform", &[], p, &[], &[&y], grid_1d(n as u64, WG))?;
    Ok(y)
}

/// out[shape] = f(a, b) with a, b broadcast to `shape` (a_shape/b_shape right-aligned).
pub fn binary(kind: BinaryKind, a: &BufView, a_shape: &[usize], b: &BufView, b_shape: &[usize], shape: &[usize]) -> Result<BufView> {
    check_u32("binary", shape)?;
    let n = crate::shape::numel(shape);
    let y = out(a, n, "binary output")?;
    let broadcast = a_shape != shape || b_shape != shape;
    let p = Params::new().u32(n).u32(shape.len()).u32(0).u32(0).dims8(shape).dims8(&crate::shape::broadcast_strides(a_shape, shape)).dims8(&crate::shape::broadcast_strides(b_shape, shape));
    let consts = [("OP", kind as u32 as f64), ("BROADCAST", broadcast as u32 as f64)];
    launch(&ELEMENTWISE, "binary", &consts, p, &[a, b], &[&y], grid_1d(n as u64, WG))?;
    Ok(y)
}

/// dst[dst_offset + idx·dst_strides] = src[src_offset + idx·src_strides] for every idx in `shape`.
pub fn strided_copy(src: &BufView, src_offset: usize, src_strides: &[usize], dst: &BufView, dst_offset: usize, dst_strides: &[usize], shape: &[usize]) -> Result<()> {
    check_u32("strided_copy", shape)?;
    let n = crate::shape::numel(shape);
    if n == 0 {
        return Ok(());
    }
    let p = Params::new().u32(n).u32(shape.len()).u32(src_offset).u32(dst_offset).dims8(shape).dims8(src_strides).dims8(dst_strides);
    launch(&LAYOUT, "strided_copy", &[], p, &[src], &[dst], grid_1d(n as u64, WG))
}

/// Reduction over the middle axis of [outer, axis, inner] -> [outer, inner]. `max`: max, else sum * scale.
pub fn reduce(x: &BufView, outer: usize, axis: usize, inner: usize, max: bool, scale: f32) -> Result<BufView> {
    // Long axes go in pieces of LOOP_CHUNK, then the pieces are reduced (see reduce.wgsl).
    let pieces = axis.div_ceil(LOOP_CHUNK).max(1);
    let chunk = if pieces == 1 { axis } else { LOOP_CHUNK };
    let n = outer * pieces * inner;
    let y = out(x, n, "reduction output")?;
    let p = Params::new().u32(outer).u32(axis).u32(inner).f32(if pieces == 1 { scale } else { 1.0 }).u32(chunk).u32(pieces).u32(0).u32(0);
    launch(&REDUCE, "reduce_axis", &[("OP", max as u32 as f64)], p, &[x], &[&y], grid_1d(n as u64, WG))?;
    if pieces == 1 {
        return Ok(y);
    }
    reduce(&y, outer, pieces, inner, max, scale)
}

/// The longest loop one invocation runs over data of unbounded size. Lavapipe (Mesa's gallivm) silently ends
/// an invocation's loops after 65535 iterations in all, so kernels whose loop length grows with the data
/// (reductions, softmax rows, the k loop of matmul) are launched in pieces of at most this many steps.
pub const LOOP_CHUNK: usize = 8192;

/// (log-)softmax over the middle axis of [outer, axis, inner].
pub fn softmax(x: &BufView, outer: usize, axis: usize, inner: usize, log: bool) -> Result<BufView> {
    if axis > LOOP_CHUNK {
        // Rows too long for one invocation's loops: max, shift, exp, sum and normalise as separate kernels.
        let (full, stat) = ([outer, axis, inner], [outer, 1, inner]);
        let m = reduce(x, outer, axis, inner, true, 1.0)?;
        let shifted = binary(BinaryKind::Sub, x, &full, &m, &stat, &full)?;
        let e = unary(UnaryKind::Exp, &shifted, outer * axis * inner, 0.0, 0.0)?;
        let s = reduce(&e, outer, axis, inner, false, 1.0)?;
        return if log {
            let log_s = unary(UnaryKind::Log, &s, outer * inner, 0.0, 0.0)?;
            binary(BinaryKind::Sub, &shifted, &full, &log_s, &stat, &full)
        } else {
            binary(BinaryKind::Div, &e, &full, &s, &stat, &full)
        };
    }
    let y = out(x, outer * axis * inner, "softmax output")?;
    let p = Params::new().u32(outer).u32(axis).u32(inner).u32(0);
    launch(&SOFTMAX, "softmax_forward", &[("LOG", log as u32 as f64)], p, &[x], &[&y], grid_1d((outer * inner) as u64, 64))?;
    Ok(y)
}

/// Rows longer than this take the composite cross-entropy (the fused forward loops over a row twice).
pub const CROSS_ENTROPY_MAX_CLASSES: usize = LOOP_CHUNK;

/// (loss per row [rows], log-sum-exp per row [rows]) of softmax cross-entropy with class labels.
pub fn cross_entropy_forward(x: &BufView, labels: &BufView, rows: usize, classes: usize) -> Result<(BufView, BufView)> {
    let loss_rows = out(x, rows, "cross-entropy per row")?;
    let lse = out(x, rows, "cross-entropy log-sum-exp")?;
    let p = Params::new().u32(rows).u32(classes).u32(0).u32(0);
    launch(&SOFTMAX, "cross_entropy_forward", &[], p, &[x, labels], &[&loss_rows, &lse], grid_1d(rows as u64, 64))?;
    Ok((loss_rows, lse))
}

/// dx [rows, classes] of the mean cross-entropy, given its upstream gradient g [1].
pub fn cross_entropy_backward(g: &BufView, x: &BufView, labels: &BufView, lse: &BufView, rows: usize, classes: usize) -> Result<BufView> {
    let dx = out(x, rows * classes, "cross-entropy gradient")?;
    let p = Params::new().u32(rows).u32(classes).u32(0).u32(0);
    launch(&SOFTMAX, "cross_entropy_backward", &[], p, &[g, x, labels, lse], &[&dx], grid_1d((rows * classes) as u64, 64))?;
    Ok(dx)
}

/// Cross-entropy target distributions [rows, classes] (softmax.wgsl's ce_targets): the label's class at
/// 1 - eps plus eps / classes everywhere; rows labelled `ignore` all zero.
pub fn ce_targets(labels: &BufView, rows: usize, classes: usize, ignore: Option<u32>, eps: f32) -> Result<BufView> {
    let q = out(labels, rows * classes, "cross-entropy targets")?;
    let p = Params::new().u32(rows).u32(classes).u32(ignore.unwrap_or(0) as usize).u32(ignore.is_some() as usize).f32(eps).u32(0).u32(0).u32(0);
    launch(&SOFTMAX, "ce_targets", &[], p, &[labels], &[&q], grid_1d((rows * classes) as u64, 64))?;
    Ok(q)
}

/// The matmul kernels of matmul.wgsl. `Subgroup(rows)` gives each lane `rows` rows (8, 16 or 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulVariant {
    Naive,
    Blocked,
    Vec4,
    Vec4x8,
    Tiled,
    Tiled128,
    Tiled128K16,
    Subgroup(u32),
}

impl MatmulVariant {
    /// Every variant, in the order benchmarks list them.
    pub const ALL: [MatmulVariant; 10] = [
        MatmulVariant::Naive,
        MatmulVariant::Blocked,
        MatmulVariant::Vec4,
        MatmulVariant::Vec4x8,
        MatmulVariant::Tiled,
        MatmulVariant::Tiled128,
        MatmulVariant::Tiled128K16,
        MatmulVariant::Subgroup(8),
        MatmulVariant::Subgroup(16),
        MatmulVariant::Subgroup(32),
    ];

    pub fn name(self) -> String {
        match self {
            MatmulVariant::Naive => "naive".into(),
            MatmulVariant::Blocked => "blocked-4x4".into(),
            MatmulVariant::Vec4 => "vec4-4x4".into(),
            MatmulVariant::Vec4x8 => "vec4-8x8".into(),
            MatmulVariant::Tiled => "tiled-64x64".into(),
            MatmulVariant::Tiled128 => "tiled-128x128".into(),
            MatmulVariant::Tiled128K16 => "tiled-128x128-k16".into(),
            MatmulVariant::Subgroup(r) => format!("subgroup-{r}x4"),
        }
    }

    pub fn parse(name: &str) -> Option<MatmulVariant> {
        MatmulVariant::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Whether this variant can run this product on this adapter. Vec4 needs 16-byte aligned rows along each
    /// operand's contiguous axis; Subgroup needs subgroups of at least 8 lanes.
    pub fn supports(self, dev: &Gpu, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Result<bool> {
        Ok(match self {
            MatmulVariant::Vec4 => {
                let a_contiguous = if trans_a { m } else { k };
                let b_contiguous = if trans_b { k } else { n };
                a_contiguous % 4 == 0 && b_contiguous % 4 == 0 && (trans_a && !trans_b || k.is_multiple_of(4))
            }
            MatmulVariant::Vec4x8 | MatmulVariant::Tiled128K16 => (if trans_a { m } else { k }) % 4 == 0 && (if trans_b { k } else { n }) % 4 == 0 && k.is_multiple_of(4),
            MatmulVariant::Subgroup(_) => {
                let g = dev;
                g.features.contains(kiln_wgpu::wgpu::Features::SUBGROUP) && g.info.subgroup_min_size >= 8
            }
            _ => true,
        })
    }
}

/// One matmul as launched: what benchmarks replay to time a training step's real products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulShape {
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

thread_local! {
    static MATMUL_LOG: std::cell::RefCell<Option<Vec<MatmulShape>>> = const { std::cell::RefCell::new(None) };
}

/// Starts (true) or stops (false) logging this thread's matmuls; stopping returns what was logged.
pub fn log_matmuls(on: bool) -> Vec<MatmulShape> {
    MATMUL_LOG.with(|log| {
        let mut log = log.borrow_mut();
        let done = log.take().unwrap_or_default();
        if on {
            *log = Some(Vec::new());
        }
        done
    })
}

/// C[batch, m, n] = op(A) @ op(B). Batch strides of 0 broadcast an operand. The kernel is the autotuner's
/// choice for this adapter and shape class (crate::tune).
#[allow(clippy::too_many_arguments)]
pub fn matmul(a: &BufView, b: &BufView, batch: usize, m: usize, n: usize, k: usize, a_batch_stride: usize, b_batch_stride: usize, trans_a: bool, trans_b: bool) -> Result<BufView> {
    let dev = a.device();
    let limit = dev.max_binding_bytes() as usize;
    if batch == 1 && 4 * (m * k).max(k * n).max(m * n) > limit {
        return matmul_split(a, b, m, n, k, trans_a, trans_b, limit);
    }
    MATMUL_LOG.with(|log| {
        if let Some(v) = log.borrow_mut().as_mut() {
            v.push(MatmulShape { batch, m, n, k, trans_a, trans_b });
        }
    });
    let variant = crate::tune::matmul_variant(dev, batch, m, n, k, trans_a, trans_b)?;
    matmul_with(variant, a, b, batch, m, n, k, a_batch_stride, b_batch_stride, trans_a, trans_b)
}

/// `matmul` with a given kernel (benchmarks and the tuner). An error if the variant cannot run this shape.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    variant: MatmulVariant,
    a: &BufView,
    b: &BufView,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a_batch_stride: usize,
    b_batch_stride: usize,
    trans_a: bool,
    trans_b: bool,
) -> Result<BufView> {
    let dev = a.device();
    let c = out(a, batch * m * n, "matmul output")?;
    if batch * m * n == 0 {
        return Ok(c);
    }
    if k == 0 {
        dev.zero(&c)?;
        return Ok(c);
    }
    if !variant.supports(dev, m, n, k, trans_a, trans_b)? {
        return invalid("matmul", &[batch, m, n, k], format!("kernel {} cannot run this product on this adapter", variant.name()));
    }
    let (ta, tb) = (trans_a as u32 as f64, trans_b as u32 as f64);
    let b32 = batch as u32;
    // Texture copies of both operands, for the kernels that read them from textures.
    let mut textures: Vec<TexView> = Vec::new();
    let (mut a, mut b) = (a.clone(), b.clone());
    let (entry, consts, groups): (&'static str, Vec<(&'static str, f64)>, [u32; 3]) = match variant {
        MatmulVariant::Naive => ("matmul_naive", vec![("WG_X", 16.0), ("WG_Y", 16.0)], [n.div_ceil(16) as u32, m.div_ceil(16) as u32, b32]),
        MatmulVariant::Blocked | MatmulVariant::Vec4 => {
            let entry = if variant == MatmulVariant::Vec4 { "matmul_vec4" } else { "matmul" };
            (entry, vec![("WG_X", 8.0), ("WG_Y", 8.0)], [n.div_ceil(32) as u32, m.div_ceil(32) as u32, b32])
        }
        MatmulVariant::Vec4x8 => ("matmul_vec4x8", vec![("WG_X", 8.0), ("WG_Y", 8.0)], [n.div_ceil(64) as u32, m.div_ceil(64) as u32, b32]),
        MatmulVariant::Tiled => ("matmul_tiled", vec![], [n.div_ceil(64) as u32, m.div_ceil(64) as u32, b32]),
        MatmulVariant::Tiled128 => {
            // 16-byte slab loads where every row of both operands starts 16-byte aligned.
            let aligned = MatmulVariant::Vec4x8.supports(dev, m, n, k, trans_a, trans_b)? && a_batch_stride.is_multiple_of(4) && b_batch_stride.is_multiple_of(4);
            let entry = if aligned { "matmul_tiled128_vec4" } else { "matmul_tiled128" };
            (entry, vec![], [n.div_ceil(128) as u32, m.div_ceil(128) as u32, b32])
        }
        MatmulVariant::Tiled128K16 => {
            // Batch strides that break 16-byte alignment take the 8-deep scalar-load kernel instead.
            let aligned = a_batch_stride.is_multiple_of(4) && b_batch_stride.is_multiple_of(4);
            let entry = if aligned { "matmul_tiled128_k16" } else { "matmul_tiled128" };
            (entry, vec![], [n.div_ceil(128) as u32, m.div_ceil(128) as u32, b32])
        }
        MatmulVariant::Subgroup(rows) => {
            // 16-byte loads where an operand's contiguous axis (and batch stride) is a multiple of 4.
            let a_vec4 = (if trans_a { m } else { k }) % 4 == 0 && a_batch_stride.is_multiple_of(4);
            let b_vec4 = (if trans_b { k } else { n }) % 4 == 0 && b_batch_stride.is_multiple_of(4);
            let groups = [n.div_ceil(32) as u32, m.div_ceil(rows as usize) as u32, b32];
            // Both kernels read texture copies of the operands (matmul_subgroup.wgsl says why).
            let (a_tex, a_src) = texture_copy(&a, "matmul operand A")?;
            let (b_tex, b_src) = texture_copy(&b, "matmul operand B")?;
            textures = vec![a_tex, b_tex];
            (a, b) = (a_src, b_src);
            if a_vec4 && b_vec4 {
                ("matmul_subgroup_vec4", vec![("RB", rows as f64), ("KC", if trans_a { 8.0 } else { 32.0 })], groups)
            } else {
                ("matmul_subgroup", vec![("RB", rows as f64)], groups)
            }
        }
    };
    let mut consts = consts;
    consts.push(("TRANS_A", ta));
    consts.push(("TRANS_B", tb));
    let shader = if matches!(variant, MatmulVariant::Subgroup(_)) { &MATMUL_SUBGROUP } else { &MATMUL };
    // Long k runs as several dispatches over k ranges, each adding to C (see k_per_dispatch).
    for (k0, k1, accumulate) in k_ranges(k, k_per_dispatch(dev, entry)?) {
        let p = Params::new().u32(m).u32(n).u32(k).u32(a_batch_stride).u32(b_batch_stride).u32(k0).u32(k1).u32(0);
        consts.push(("ACCUMULATE", accumulate as u32 as f64));
        launch_textured(shader, entry, &consts, p, &[&a, &b], &[&c], &textures.iter().collect::<Vec<_>>(), groups)?;
        consts.pop();
    }
    Ok(c)
}

/// Where `conv_gemm`'s B operand is gathered from (conv_gemm in matmul_subgroup.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvGemmSource {
    /// B = im2col(x) [c_in*kh*kw, oh*ow]: the forward pass.
    Forward = 1,
    /// B = im2col(x)^T: the weight's gradient, A the output gradient.
    WeightGrad = 2,
    /// B [c_out*kh*kw, h*w] gathered from the output gradient (stride 1): the input's gradient, A the weight
    /// permuted to [c_in, c_out*kh*kw].
    InputGrad = 3,
}

/// C[batch, m, n] = A @ B_b with B gathered from `image` (sample b at `b * image_batch_stride`) as `source`
/// says, without an im2col buffer. `conv` is [c_in, h, w, kh, kw, oh, ow, stride_h, stride_w, pad_h, pad_w,
/// dil_h, dil_w] of the convolution. Needs subgroups of at least 8 lanes (`conv_gemm_preferred` checks).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_gemm(
    source: ConvGemmSource,
    a: &BufView,
    image: &BufView,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a_batch_stride: usize,
    image_batch_stride: usize,
    conv: [usize; 13],
) -> Result<BufView> {
    let c = out(a, batch * m * n, "convolution product")?;
    if batch * m * n == 0 {
        return Ok(c);
    }
    // Logged as the product it computes (the im2col columns are B, or B's transpose for the weight gradient).
    MATMUL_LOG.with(|log| {
        if let Some(v) = log.borrow_mut().as_mut() {
            v.push(MatmulShape { batch, m, n, k, trans_a: false, trans_b: source == ConvGemmSource::WeightGrad });
        }
    });
    let (a_tex, a_src) = texture_copy(a, "convolution operand A")?;
    let (b_tex, b_src) = texture_copy(image, "convolution image")?;
    let rows = if m <= 8 { 8 } else { 16 };
    // Row-packed columns where a lane's 4 neighbours in an image row read 4 consecutive floats (see the shader).
    let [_, _, w, _, _, _, ow, _, stride_w, ..] = conv;
    let width = if source == ConvGemmSource::InputGrad { w } else { ow };
    let packed = match source {
        ConvGemmSource::Forward => stride_w == 1,
        ConvGemmSource::InputGrad => true,
        ConvGemmSource::WeightGrad => false,
    };
    let columns = if packed { n / width * width.next_multiple_of(4) } else { n };
    let consts =
        |accumulate: bool| [("RB", rows as f64), ("B_SOURCE", source as u32 as f64), ("PACKED", packed as u32 as f64), ("TRANS_A", 0.0), ("TRANS_B", 0.0), ("ACCUMULATE", accumulate as u32 as f64)];
    let groups = [columns.div_ceil(32) as u32, m.div_ceil(rows) as u32, batch as u32];
    for (k0, k1, accumulate) in k_ranges(k, k_per_dispatch(a.device(), "matmul_subgroup")?) {
        let p = conv.iter().fold(Params::new().u32(m).u32(n).u32(k).u32(a_batch_stride).u32(image_batch_stride).u32(k0).u32(k1).u32(0), |p, &v| p.u32(v));
        launch_textured(&MATMUL_SUBGROUP, "conv_gemm", &consts(accumulate), p.u32(0), &[&a_src, &b_src], &[&c], &[&a_tex, &b_tex], groups)?;
    }
    Ok(c)
}

/// How convolutions (groups = 1, not 1x1) become products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvLowering {
    /// `Implicit` on CPU adapters, `Im2col` elsewhere.
    Auto = 0,
    /// `conv_gemm`: the im2col columns gathered inside the product (needs subgroups of 8+ lanes).
    Implicit = 1,
    /// im2col columns written to a buffer, then the tuned matmul.
    Im2col = 2,
}

static CONV_LOWERING_ENV: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();

/// Sets the lowering on one device (the process default is `KILN_CONV=implicit|im2col|auto`).
pub fn set_conv_lowering(dev: &Gpu, l: ConvLowering) {
    dev.set_setting(
        "conv_implicit",
        match l {
            ConvLowering::Auto => None,
            ConvLowering::Implicit => Some(1),
            ConvLowering::Im2col => Some(0),
        },
    );
}

/// Whether convolutions run through `conv_gemm` here. Auto picks it where the adapter is a CPU (lavapipe), whose
/// storage-buffer reads are slow and texture fetches fast (docs/how-it-runs.md); GPUs keep im2col and the
/// tuned matmul. Without subgroups it never runs.
pub fn conv_gemm_preferred(dev: &Gpu) -> Result<bool> {
    if !MatmulVariant::Subgroup(8).supports(dev, 1, 1, 1, false, false)? {
        return Ok(false);
    }
    Ok(switch(dev, "conv_implicit", &CONV_LOWERING_ENV, "KILN_CONV").unwrap_or(dev.info.device_type == kiln_wgpu::wgpu::DeviceType::Cpu))
}

/// A texture copy of `view`, and the view it was copied from: a view at an offset a texture copy cannot start
/// from is first copied to a buffer of its own (which also binds where `view` could not).
fn texture_copy(view: &BufView, what: &str) -> Result<(TexView, BufView)> {
    let g = view.device();
    let align = (g.limits.min_storage_buffer_offset_alignment as u64).max(16);
    if view.offset.is_multiple_of(align) && view.offset + view.bytes.div_ceil(16) * 16 <= view.buffer.capacity() {
        return Ok((g.texture_of(view, what)?, view.clone()));
    }
    let own = out(view, view.bytes.div_ceil(4) as usize, what)?;
    g.copy(view, &own, view.bytes.div_ceil(4) * 4)?;
    Ok((g.texture_of(&own, what)?, own))
}

/// The k ranges [k0, k1) of a product split `step` at a time, and whether each adds to what the ones before
/// it wrote (ACCUMULATE).
fn k_ranges(k: usize, step: usize) -> impl Iterator<Item = (usize, usize, bool)> {
    (0..k).step_by(step).map(move |k0| (k0, (k0 + step).min(k), k0 > 0))
}

/// How much of k one matmul dispatch may cover. Lavapipe (Mesa's gallivm: CPU adapters) ends an invocation's
/// loops after 65535 iterations in all, silently; each kernel's loop count per k step was measured there
/// (every kernel is tested right at three times its limit). Real GPUs take k whole.
fn k_per_dispatch(dev: &Gpu, entry: &str) -> Result<usize> {
    if dev.info.device_type != kiln_wgpu::wgpu::DeviceType::Cpu {
        return Ok(usize::MAX);
    }
    Ok(match entry {
        "matmul_subgroup" => 1024,
        "matmul_subgroup_vec4" => 2048,
        "matmul_tiled" | "matmul_tiled128" | "matmul_tiled128_vec4" | "matmul_tiled128_k16" => 8192,
        _ => 4 * LOOP_CHUNK,
    })
}

/// A 2-D product with an operand larger than one storage binding: split along the axis that keeps the big
/// operand's pieces contiguous (so they bind as sub-ranges), slicing the small operands with strided copies:
/// a big op(B) [k, n] splits by n (stored [n, k]) or k (stored [k, n]); a big op(A) or C splits by m, or by k
/// when A is stored [k, m]. Two operands over the limit at once is an error that names it.
#[allow(clippy::too_many_arguments)]
fn matmul_split(a: &BufView, b: &BufView, m: usize, n: usize, k: usize, ta: bool, tb: bool, limit: usize) -> Result<BufView> {
    let g = a.device();
    let big = |elems: usize| 4 * elems > limit;
    let (a_big, b_big, c_big) = (big(m * k), big(k * n), big(m * n));
    if [a_big, b_big, c_big].iter().filter(|&&x| x).count() > 1 {
        return Err(kiln_wgpu::GpuError::BindingTooLarge {
            bytes: 4 * (m * k).max(k * n).max(m * n) as u64,
            limit: limit as u64,
            what: format!("matmul [{m}x{k}] @ [{k}x{n}]: two operands over the limit"),
        }
        .into());
    }
    let align = g.limits.min_storage_buffer_offset_alignment.max(4) as usize;
    // Rows per piece: as many as fit in half the limit, a multiple that keeps piece offsets aligned.
    let rows_per_piece = |row_elems: usize| {
        let step = align / gcd(align, 4 * row_elems.max(1));
        ((limit / 2) / (4 * row_elems.max(1)) / step * step).max(step)
    };
    // A column block [r0, r0 + rows) of a row-major [outer, cols] matrix, copied out contiguous.
    let columns = |src: &BufView, outer: usize, cols: usize, r0: usize, rows: usize| -> Result<BufView> {
        let dst = out(src, outer * rows, "matmul piece")?;
        strided_copy(src, r0, &[cols, 1], &dst, 0, &[rows, 1], &[outer, rows])?;
        Ok(dst)
    };
    // Rows [r0, r0 + rows) of a row-major matrix: bound in place when the offset is aligned, else copied out
    // (copies need only 4-byte alignment; only the small operands' pieces can be unaligned).
    let rows_of = |src: &BufView, row_elems: usize, r0: usize, rows: usize| -> Result<BufView> {
        let (offset, bytes) = ((4 * r0 * row_elems) as u64, (4 * rows * row_elems) as u64);
        if offset % align as u64 == 0 {
            return Ok(src.sub(offset, bytes));
        }
        let dst = out(src, rows * row_elems, "matmul piece")?;
        g.copy(&src.sub(offset, bytes), &dst, bytes)?;
        Ok(dst)
    };
    let c = out(a, m * n, "matmul output")?;
    if b_big && tb {
        // C[:, n0..n1] = op(A) @ B_stored[n0..n1]^T, scattered into C's columns.
        let step = rows_per_piece(k);
        for n0 in (0..n).step_by(step) {
            let rows = step.min(n - n0);
            let piece = matmul(a, &rows_of(b, k, n0, rows)?, 1, m, rows, k, 0, 0, ta, true)?;
            strided_copy(&piece, 0, &[rows, 1], &c, n0, &[n, 1], &[m, rows])?;
        }
        return Ok(c);
    }
    if (b_big && !tb) || (a_big && ta) {
        // C = sum over k-pieces of op(A)[:, k0..k1] @ op(B)[k0..k1, :].
        let step = if b_big { rows_per_piece(n) } else { rows_per_piece(m) };
        let mut acc: Option<BufView> = None;
        for k0 in (0..k).step_by(step) {
            let rows = step.min(k - k0);
            let ap = if ta { rows_of(a, m, k0, rows)? } else { columns(a, m, k, k0, rows)? };
            let bp = if tb { columns(b, n, k, k0, rows)? } else { rows_of(b, n, k0, rows)? };
            let part = matmul(&ap, &bp, 1, m, n, rows, 0, 0, ta, tb)?;
            acc = Some(match acc {
                None => part,
                Some(sum) => binary(BinaryKind::Add, &sum, &[m, n], &part, &[m, n], &[m, n])?,
            });
        }
        return Ok(acc.unwrap_or(c));
    }
    // A big op(A) stored [m, k], or a big C: C[m0..m1] = op(A)[m0..m1, :] @ op(B), copied into C's rows.
    let step = if a_big { rows_per_piece(k) } else { rows_per_piece(n).min(rows_per_piece(k)) };
    for m0 in (0..m).step_by(step) {
        let rows = step.min(m - m0);
        let ap = if ta { columns(a, k, m, m0, rows)? } else { rows_of(a, k, m0, rows)? };
        let piece = matmul(&ap, b, 1, rows, n, k, 0, 0, ta, tb)?;
        g.copy(&piece, &c.sub((4 * m0 * n) as u64, (4 * rows * n) as u64), (4 * rows * n) as u64)?;
    }
    Ok(c)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// out[outer, n_idx, inner] = x[outer, idx[j], inner]
pub fn index_select(x: &BufView, idx: &BufView, outer: usize, src_axis: usize, inner: usize, n_idx: usize) -> Result<BufView> {
    let n = outer * n_idx * inner;
    let y = out(x, n, "index_select output")?;
    let p = Params::new().u32(outer).u32(src_axis).u32(inner).u32(n_idx).u32(0).u32(n_idx).u32(0).u32(0);
    launch(&INDEX, "index_select_forward", &[], p, &[x, idx], &[&y], grid_1d(n as u64, WG))?;
    Ok(y)
}

/// grad_x[outer, src_axis, inner] = sum over j with idx[j] == r of grad_out[outer, j, inner]
pub fn index_select_backward(grad_out: &BufView, idx: &BufView, outer: usize, src_axis: usize, inner: usize, n_idx: usize) -> Result<BufView> {
    if outer == 1 && n_idx > 0 && src_axis <= EMBED_MAX && n_idx <= EMBED_MAX {
        return embedding_backward(grad_out, idx, src_axis, inner, n_idx);
    }
    index_select_backward_general(grad_out, idx, outer, src_axis, inner, n_idx)
}

/// The general gradient of index_select: every output element loops over every index (O(outer x rows x inner x
/// indices)); the benchmark times it beside the counting-sort path.
pub fn index_select_backward_general(grad_out: &BufView, idx: &BufView, outer: usize, src_axis: usize, inner: usize, n_idx: usize) -> Result<BufView> {
    let n = outer * src_axis * inner;
    let y = out(grad_out, n, "index_select gradient")?;
    // Many indices run as several dispatches over index ranges, each adding to the gradient (LOOP_CHUNK).
    if n_idx == 0 {
        y.device().zero(&y)?;
        return Ok(y);
    }
    for (i, j0) in (0..n_idx).step_by(LOOP_CHUNK).enumerate() {
        let j1 = (j0 + LOOP_CHUNK).min(n_idx);
        let p = Params::new().u32(outer).u32(src_axis).u32(inner).u32(n_idx).u32(j0).u32(j1).u32((i > 0) as usize).u32(0);
        launch(&INDEX, "index_select_backward", &[], p, &[grad_out, idx], &[&y], grid_1d(n as u64, WG))?;
    }
    Ok(y)
}

/// Rows and indices up to which index_select along axis 0 (an embedding) takes the counting-sort gradient (the
/// scan and the segment loops run in one invocation each, under lavapipe's 65535-iteration cap); larger ones
/// take the general kernel.
pub const EMBED_MAX: usize = 65535;

/// grad_table [rows, dim] from grad_out [m, dim] and idx [m] in O(m x dim) (embedding.wgsl): count, scan,
/// place, sort each row's occurrences, sum them in ascending order.
pub fn embedding_backward(grad_out: &BufView, idx: &BufView, rows: usize, dim: usize, m: usize) -> Result<BufView> {
    let dev = grad_out.device();
    let p = || Params::new().u32(m).u32(rows).u32(dim).u32(0);
    let counts = out(idx, rows, "embedding gradient counts")?;
    let cursor = out(idx, rows, "embedding gradient cursor")?;
    dev.zero(&counts)?;
    dev.zero(&cursor)?;
    launch(&EMBEDDING, "embed_count", &[], p(), &[idx], &[&counts], grid_1d(m as u64, WG))?;
    let starts = out(idx, rows + 1, "embedding gradient segments")?;
    launch(&EMBEDDING, "embed_scan", &[], p(), &[&counts], &[&starts], [1, 1, 1])?;
    let order = out(idx, m, "embedding gradient order")?;
    launch(&EMBEDDING, "embed_place", &[], p(), &[idx, &starts], &[&cursor, &order], grid_1d(m as u64, WG))?;
    launch(&EMBEDDING, "embed_sort", &[], p(), &[&starts], &[&order], grid_1d(rows as u64, WG))?;
    let grad = out(grad_out, rows * dim, "embedding gradient")?;
    launch(&EMBEDDING, "embed_sum", &[], p(), &[grad_out, &order, &starts], &[&grad], grid_1d((rows * dim) as u64, WG))?;
    Ok(grad)
}

/// labels: [n] u32 -> [n, classes] f32
pub fn one_hot(labels: &BufView, n: usize, classes: usize) -> Result<BufView> {
    let y = out(labels, n * classes, "one_hot output")?;
    let p = Params::new().u32(n).u32(classes).u32(0).u32(0);
    launch(&INDEX, "one_hot", &[], p, &[labels], &[&y], grid_1d((n * classes) as u64, WG))?;
    Ok(y)
}

/// Which update `optimizer_step` runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UpdateRule {
    /// SGD with momentum (0 = plain gradient descent), optionally Nesterov.
    Sgd {
        momentum: f32,
        nesterov: bool,
    },
    RmsProp {
        alpha: f32,
        eps: f32,
    },
    /// Adam; `decoupled` makes it AdamW.
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        step: u64,
        decoupled: bool,
    },
}

/// One dispatch updating a flat parameter buffer in place. `state2` is only read by Adam.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step(rule: UpdateRule, params: &BufView, grads: &BufView, state1: &BufView, state2: &BufView, n: usize, decay_end: usize, lr: f32, weight_decay: f32) -> Result<()> {
    let (entry, beta1, beta2, eps, bias1, bias2, nesterov, decoupled) = match rule {
        UpdateRule::Sgd { momentum, nesterov } => ("sgd_step", momentum, 0.0, 0.0, 1.0, 1.0, nesterov, false),
        UpdateRule::RmsProp { alpha, eps } => ("rmsprop_step", alpha, 0.0, eps, 1.0, 1.0, false, false),
        UpdateRule::Adam { beta1, beta2, eps, step, decoupled } => {
            let t = step.max(1) as i32;
            ("adam_step", beta1, beta2, eps, 1.0 - beta1.powi(t), 1.0 - beta2.powi(t), false, decoupled)
        }
    };
    let make_params = |n: usize, decay_end: usize| {
        Params::new().u32(n).u32(decay_end).f32(lr).f32(weight_decay).f32(beta1).f32(beta2).f32(eps).f32(bias1).f32(bias2).u32(nesterov as usize).u32(decoupled as usize).u32(0)
    };
    let views = [grads, params, state1, state2];
    // On CPU adapters Adam reads texture copies and writes 4 parameters per invocation, over the longest prefix
    // whose end can start a binding; the few parameters after it (the run may end just before another
    // parameter's values) take the scalar kernel.
    let align = (params.device().limits.min_storage_buffer_offset_alignment as usize / 4).max(4);
    let body = n / align * align;
    if entry == "adam_step" && body > 0 && texture_reads(params.device())? && views.iter().all(|v| v.offset % 16 == 0) {
        let part = |v: &BufView, from: usize, count: usize| v.sub(4 * from as u64, 4 * count as u64);
        let copies = views.iter().map(|v| Ok(texture_copy(&part(v, 0, body), "optimizer operand")?.0)).collect::<Result<Vec<_>>>()?;
        let outs = [part(params, 0, body), part(state1, 0, body), part(state2, 0, body)];
        launch_textured(&OPTIM, "adam_step4", &[], make_params(body, decay_end.min(body)), &[], &[&outs[0], &outs[1], &outs[2]], &copies.iter().collect::<Vec<_>>(), grid_1d((body / 4) as u64, WG))?;
        if body < n {
            let rest = n - body;
            let [g, p, s1, s2] = views.map(|v| part(v, body, rest));
            launch(&OPTIM, entry, &[], make_params(rest, decay_end.saturating_sub(body)), &[&g], &[&p, &s1, &s2], grid_1d(rest as u64, WG))?;
        }
        return Ok(());
    }
    launch(&OPTIM, entry, &[], make_params(n, decay_end), &[grads], &[params, state1, state2], grid_1d(n as u64, WG))
}

/// recurrent.wgsl's params for step `t` of a pass.
fn rnn_params(g: &crate::rnn::SeqGeom, t: usize, has_len: bool, dstride: usize) -> Params {
    let (before, after) = g.slots(t);
    Params::new().u32(g.n).u32(g.hidden).u32(t).u32(has_len as usize).u32(before * g.slot).u32(after * g.slot).u32(g.kind.acts_width(g.hidden)).u32(dstride)
}

/// One fused recurrent step forward (recurrent.wgsl): xg [T * n, GH], hg = h W_hh^T [n, GH], b_hh [GH],
/// lens [n] -> the state slot after step t in `states`, the step's activations in `acts`.
#[allow(clippy::too_many_arguments)]
pub fn rnn_step_forward(g: &crate::rnn::SeqGeom, t: usize, xg: &BufView, hg: &BufView, b_hh: &BufView, lens: &BufView, has_len: bool, states: &BufView, acts: &BufView) -> Result<()> {
    let p = rnn_params(g, t, has_len, 0);
    launch(&RECURRENT, "rnn_forward", &[("KIND", g.kind.code() as f64)], p, &[xg, hg, b_hh, lens], &[states, acts], grid_1d((g.n * g.hidden) as u64, WG))
}

/// One fused recurrent step backward (recurrent.wgsl): the gradients of step t's input and recurrent
/// projections into row block t of `dxg` and `dhg` (blocks `dstride` apart); `carry` [2, n, H] holds the
/// gradient passed straight to the state before (read, then overwritten).
#[allow(clippy::too_many_arguments)]
pub fn rnn_step_backward(
    g: &crate::rnn::SeqGeom,
    t: usize,
    dstride: usize,
    acts: &BufView,
    states: &BufView,
    g_states: &BufView,
    dh_rec: &BufView,
    lens: &BufView,
    has_len: bool,
    dxg: &BufView,
    dhg: &BufView,
    carry: &BufView,
) -> Result<()> {
    let p = rnn_params(g, t, has_len, dstride);
    launch(&RECURRENT, "rnn_backward", &[("KIND", g.kind.code() as f64)], p, &[acts, states, g_states, dh_rec, lens], &[dxg, dhg, carry], grid_1d((g.n * g.hidden) as u64, WG))
}

/// Iterations one invocation's loops may run in all on `dev`: lavapipe (Mesa's gallivm, CPU adapters) silently
/// ends them after 65,535, so kernels with long loops split their work over dispatches there (60,000 leaves
/// room for the loops outside the counted ones). None on GPUs: no cap.
pub fn loop_cap(dev: &Gpu) -> Option<usize> {
    (dev.info.device_type == kiln_wgpu::wgpu::DeviceType::Cpu).then_some(60_000)
}

static ATTENTION_TILES_ENV: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();

/// Whether the fused attention forward shares key tiles through workgroup memory (GPUs) or reads them per
/// query row (CPU adapters, where the barriers cost more than the sharing saves: 30% on lavapipe). The
/// device setting "attention_tiles", else `KILN_ATTN_TILES=on|off`, else by adapter type.
pub fn attention_tiles(dev: &Gpu) -> bool {
    switch(dev, "attention_tiles", &ATTENTION_TILES_ENV, "KILN_ATTN_TILES").unwrap_or(dev.info.device_type != kiln_wgpu::wgpu::DeviceType::Cpu)
}

/// The geometry of one fused attention (attention.wgsl).
#[derive(Clone, Copy, Debug)]
pub struct AttnGeom {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub dv: usize,
    pub causal: bool,
    pub has_mask: bool,
    /// 0 for a [tq, tk] mask shared by the batch, tq * tk for [b, tq, tk].
    pub mask_bstride: usize,
    pub scale: f32,
    pub dropout: Option<(f32, u64)>,
    /// Keys (and, for dk and dv, queries) per dispatch: a row longer than this runs as several dispatches,
    /// each resuming from the last (CPU adapters' loop cap; [`crate::attention::attention_chunk`]).
    pub chunk: usize,
}

impl AttnGeom {
    /// How many dispatches cover the longer of the two sequences.
    fn chunks(&self) -> usize {
        self.tq.max(self.tk).div_ceil(self.chunk.max(1)).max(1)
    }
    fn constants(&self) -> [(&'static str, f64); 2] {
        [("DQ", self.d as f64), ("DV", self.dv as f64)]
    }
    /// The parameters of dispatch `c`: keys and queries [c * chunk, (c + 1) * chunk), clipped.
    fn params(&self, c: usize) -> Params {
        let (p, seed) = self.dropout.unwrap_or((0.0, 0));
        let step = self.chunk.max(1);
        let (k_lo, k_hi) = ((c * step).min(self.tk), (c * step).saturating_add(step).min(self.tk));
        let (q_lo, q_hi) = ((c * step).min(self.tq), (c * step).saturating_add(step).min(self.tq));
        Params::new()
            .u32(self.batch)
            .u32(self.tq)
            .u32(self.tk)
            .u32(self.d)
            .u32(self.dv)
            .u32(self.causal as usize)
            .u32(self.has_mask as usize)
            .u32(self.mask_bstride)
            .f32(self.scale)
            .f32(p)
            .u32((seed & 0xffff_ffff) as usize)
            .u32((seed >> 32) as usize)
            .u32(k_lo)
            .u32(k_hi)
            .u32(q_lo)
            .u32(q_hi)
    }
}

/// Fused attention forward: (o [b, tq, dv], lse [b, tq]).
pub fn attention_forward(g: &AttnGeom, q: &BufView, k: &BufView, v: &BufView, mask: &BufView) -> Result<(BufView, BufView)> {
    let o = out(q, g.batch * g.tq * g.dv, "attention output")?;
    let lse = out(q, g.batch * g.tq, "attention log-sum-exp")?;
    // Chunks past the keys (tq > tk) would change nothing.
    for c in 0..g.tk.div_ceil(g.chunk.max(1)).max(1) {
        if attention_tiles(q.device()) {
            launch(&ATTENTION, "attn_forward", &g.constants(), g.params(c), &[q, k, v, mask], &[&o, &lse], [g.tq.div_ceil(64) as u32, g.batch as u32, 1])?;
        } else {
            launch(&ATTENTION, "attn_forward_rows", &g.constants(), g.params(c), &[q, k, v, mask], &[&o, &lse], grid_1d((g.batch * g.tq) as u64, 64))?;
        }
    }
    Ok((o, lse))
}

/// Fused attention backward: [dq [b, tq, d], dk [b, tk, d], dv [b, tk, dv]] in one buffer.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(g: &AttnGeom, q: &BufView, k: &BufView, v: &BufView, mask: &BufView, o: &BufView, d_o: &BufView, lse: &BufView) -> Result<BufView> {
    let dqkv = out(q, g.batch * (g.tq * g.d + g.tk * g.d + g.tk * g.dv), "attention gradients")?;
    let groups = g.tq.div_ceil(64) + g.tk.div_ceil(64);
    for c in 0..g.chunks() {
        launch(&ATTENTION, "attn_backward", &g.constants(), g.params(c), &[q, k, v, mask, o, d_o, lse], &[&dqkv], [groups as u32, g.batch as u32, 1])?;
    }
    Ok(dqkv)
}

/// RoI-Align's parameters (roi.wgsl): x [n, c, h, w], k RoIs, RoIs [k_begin, k_end) for the backward.
fn roi_params(x: [usize; 4], k: usize, g: &crate::vision::RoiAlignGeom, k_range: (usize, usize)) -> Params {
    roi_params_rows(x, k, g, k_range, (0, x[2]))
}

/// `roi_params` with the forward passes' band of rows [begin, end) (RoI pooling: image rows; RoI-Align: a
/// bin's sample rows), and padding.
fn roi_params_rows(x: [usize; 4], k: usize, g: &crate::vision::RoiAlignGeom, k_range: (usize, usize), rows: (usize, usize)) -> Params {
    let [n, c, h, w] = x;
    Params::new()
        .u32(n)
        .u32(c)
        .u32(h)
        .u32(w)
        .u32(k)
        .u32(g.output_size[0])
        .u32(g.output_size[1])
        .u32(g.sampling_ratio.max(0) as usize)
        .f32(g.spatial_scale)
        .u32(g.aligned as usize)
        .u32(k_range.0)
        .u32(k_range.1)
        .u32(rows.0)
        .u32(rows.1)
        .u32(0)
        .u32(0)
}

/// y [k, c, ph, pw] of RoI-Align over x [n, c, h, w] (roi_align_forward), in dispatches of `band` sample
/// rows a bin until `rows` (the most a bin can have inside the map), each adding to the last.
#[allow(clippy::too_many_arguments)]
pub fn roi_align_forward(x: &BufView, rois: &BufView, xs: [usize; 4], k: usize, g: &crate::vision::RoiAlignGeom, band: usize, rows: usize) -> Result<BufView> {
    let total = k * xs[1] * g.output_size[0] * g.output_size[1];
    let y = out(x, total, "roi_align output")?;
    let mut begin = 0;
    loop {
        let end = begin + band.max(1);
        launch(&ROI, "roi_align_forward", &[], roi_params_rows(xs, k, g, (0, k), (begin, end)), &[x, rois], &[&y], grid_1d(total as u64, WG))?;
        begin = end;
        if begin >= rows {
            return Ok(y);
        }
    }
}

/// Channels summed by one invocation of roi_align_backward (ROI_CB in roi.wgsl).
pub const ROI_CB: usize = 8;

/// dx [n, c, h, w] of RoI-Align from gy [k, c, ph, pw] (roi_align_backward), in dispatches of `chunk` RoIs.
pub fn roi_align_backward(gy: &BufView, rois: &BufView, xs: [usize; 4], k: usize, g: &crate::vision::RoiAlignGeom, chunk: usize) -> Result<BufView> {
    let total = xs.iter().product::<usize>();
    let dx = out(gy, total, "roi_align input gradient")?;
    let mut begin = 0;
    loop {
        let end = (begin + chunk.max(1)).min(k);
        // One invocation per pixel and block of ROI_CB channels.
        let threads = xs[0] * xs[1].div_ceil(ROI_CB) * xs[2] * xs[3];
        launch(&ROI, "roi_align_backward", &[], roi_params(xs, k, g, (begin, end)), &[gy, rois], &[&dx], grid_1d(threads as u64, WG))?;
        begin = end;
        if begin >= k {
            return Ok(dx);
        }
    }
}

/// What `nms` suppresses and keeps (vision.rs's NmsOptions, resolved).
#[derive(Clone, Copy, Debug)]
pub struct NmsSpec {
    pub n: usize,
    pub iou: f32,
    /// Candidates score above this; None: every box but those with NaN scores.
    pub score: Option<f32>,
    pub max_keep: usize,
    /// Suppress at IoU equal to the threshold too.
    pub inclusive: bool,
}

fn nms_params(s: &NmsSpec, words: usize, block: (usize, usize), sort: (usize, usize), per_class: bool) -> Params {
    Params::new()
        .u32(s.n)
        .u32(words)
        .u32(block.0)
        .u32(block.1)
        .f32(s.iou)
        .f32(s.score.unwrap_or(0.0))
        .u32(s.max_keep)
        .u32(s.inclusive as usize)
        .u32(sort.0)
        .u32(sort.1)
        .u32(per_class as usize)
        .u32(s.score.is_some() as usize)
        .u32(s.n.next_power_of_two())
        .u32(0)
        .u32(0)
        .u32(0)
}

/// Greedy NMS (nms.wgsl) of boxes [n, 4] by scores [n], per class when `classes` [n] (u32) is given: (keep [n]
/// u32, the kept boxes' indices by descending score, then n; count [1] u32). `loop_cap` bounds each
/// invocation's loops (CPU adapters).
pub fn nms(boxes: &BufView, scores: &BufView, classes: Option<&BufView>, s: NmsSpec, loop_cap: Option<usize>) -> Result<(BufView, BufView)> {
    let dev = boxes.device();
    let n = s.n;
    let words = n.div_ceil(32).max(1);
    let zeros = |len: usize, what: &str| -> Result<BufView> {
        let b = out(boxes, len, what)?;
        launch(&ELEMENTWISE, "unary", &[("OP", UnaryKind::Fill as u32 as f64)], Params::new().u32(len).u32(0).f32(0.0).f32(0.0), &[scores], &[&b], grid_1d(len as u64, WG))?;
        Ok(b)
    };
    // The ranking: a bitonic sort of (score key, index) pairs over n rounded up to a power of two, in
    // log2 (log2 + 1) / 2 dispatches of O(1) work an invocation (n log^2 n in all; 153 stages at 100k boxes).
    let sort_len = n.next_power_of_two();
    let key = out(boxes, sort_len, "nms sort keys")?;
    let order = out(boxes, sort_len, "nms order")?;
    let keep = out(boxes, n, "nms kept indices")?;
    launch(&NMS, "nms_sort_init", &[], nms_params(&s, words, (0, 0), (0, 0), false), &[scores], &[&key, &order, &keep], grid_1d(sort_len as u64, WG))?;
    let mut k = 2;
    while k <= sort_len {
        let mut j = k / 2;
        while j > 0 {
            launch(&NMS, "nms_sort_step", &[], nms_params(&s, words, (0, 0), (k, j), false), &[], &[&key, &order], grid_1d((sort_len / 2) as u64, WG))?;
            j /= 2;
        }
        k *= 2;
    }
    let removed = zeros(words, "nms removed bits")?;
    let count = zeros(1, "nms count")?;
    // Rows per block: a 16 M-word mask at most, and (CPU adapters) a scan within the loop cap.
    let mut block = (16 << 20) / words;
    if let Some(cap) = loop_cap {
        block = block.min(cap / (words.div_ceil(256) + 2));
    }
    let block = block.clamp(1, n.max(1));
    let mask = dev.alloc(4 * (block * words) as u64, "nms overlap bits")?;
    let sorted_boxes = out(boxes, 4 * n, "nms sorted boxes")?;
    let sorted_classes = out(boxes, if classes.is_some() { n } else { 1 }, "nms sorted classes")?;
    let class_view = classes.unwrap_or(scores);
    launch(&NMS, "nms_gather", &[], nms_params(&s, words, (0, 0), (0, 0), classes.is_some()), &[boxes, &order, class_view], &[&sorted_boxes, &sorted_classes], grid_1d(n as u64, WG))?;
    let mut begin = 0;
    while begin < n {
        let len = block.min(n - begin);
        let p = || nms_params(&s, words, (begin, len), (0, 0), classes.is_some());
        launch(&NMS, "nms_mask", &[], p(), &[&sorted_boxes, &sorted_classes, &key], &[&mask], grid_1d((len * words) as u64, WG))?;
        launch(&NMS, "nms_scan", &[], p(), &[scores, &order, &mask], &[&removed, &keep, &count], [1, 1, 1])?;
        begin += len;
    }
    Ok((keep, count))
}

/// RoI max pooling (roi.wgsl's roi_pool_forward): (y [k, c, ph, pw], argmax [k, c, ph, pw] u32), in
/// dispatches of `band` image rows (each resuming from the last one's max and argmax).
pub fn roi_pool_forward(x: &BufView, rois: &BufView, xs: [usize; 4], k: usize, g: &crate::vision::RoiAlignGeom, band: usize) -> Result<(BufView, BufView)> {
    let total = k * xs[1] * g.output_size[0] * g.output_size[1];
    let y = out(x, total, "roi_pool output")?;
    let arg = out(x, total, "roi_pool argmax")?;
    let mut begin = 0;
    loop {
        let end = (begin + band.max(1)).min(xs[2]);
        launch(&ROI, "roi_pool_forward", &[], roi_params_rows(xs, k, g, (0, k), (begin, end)), &[x, rois], &[&y, &arg], grid_1d(total as u64, WG))?;
        begin = end;
        if begin >= xs[2] {
            return Ok((y, arg));
        }
    }
}

/// dx [n, c, h, w] of RoI max pooling from gy at the argmax (roi_pool_backward), in dispatches of `chunk` RoIs.
#[allow(clippy::too_many_arguments)]
pub fn roi_pool_backward(gy: &BufView, rois: &BufView, argmax: &BufView, xs: [usize; 4], k: usize, g: &crate::vision::RoiAlignGeom, chunk: usize) -> Result<BufView> {
    let total = xs.iter().product::<usize>();
    let dx = out(gy, total, "roi_pool input gradient")?;
    let mut begin = 0;
    loop {
        let end = (begin + chunk.max(1)).min(k);
        launch(&ROI, "roi_pool_backward", &[], roi_params(xs, k, g, (begin, end)), &[gy, rois, argmax], &[&dx], grid_1d(total as u64, WG))?;
        begin = end;
        if begin >= k {
            return Ok(dx);
        }
    }
}

/// src [n, c, h, w] read at RoI pooling's argmax -> [k, c, ph, pw] (roi_pool_gather).
pub fn roi_pool_gather(src: &BufView, rois: &BufView, argmax: &BufView, xs: [usize; 4], k: usize, g: &crate::vision::RoiAlignGeom) -> Result<BufView> {
    let total = k * xs[1] * g.output_size[0] * g.output_size[1];
    let y = out(src, total, "roi_pool gather")?;
    launch(&ROI, "roi_pool_gather", &[], roi_params(xs, k, g, (0, k)), &[src, rois, argmax], &[&y], grid_1d(total as u64, WG))?;
    Ok(y)
}
