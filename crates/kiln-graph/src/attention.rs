//! Scaled dot-product attention as one op: softmax(q k^T * scale + mask) v, optionally causal and with dropout
//! on the probabilities. Fused (shaders/attention.wgsl, flash-style), the forward pass is one kernel that never
//! stores the [tq, tk] scores (it keeps each query row's log-sum-exp) and the backward pass one kernel that
//! recomputes them; memory grows linearly in the sequence length. The composed form (matmul, softmax, matmul)
//! runs with fusion off, for head sizes above [`ATTN_MAX_DIM`], for a mask that needs a gradient, and under
//! `backward_create_graph`.

use crate::backprop::Op;
use crate::error::{KilnError, Result};
use crate::kernels;
use crate::tensor::{DType, Tensor};

/// The largest head size (of q, k and of v) the fused kernels take.
pub const ATTN_MAX_DIM: usize = 128;

/// What the fused op keeps for its backward rule.
pub struct AttnSaved {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub mask: Option<Tensor>,
    pub causal: bool,
    pub scale: f32,
    /// (probability, seed)
    pub dropout: Option<(f32, u64)>,
    /// log-sum-exp of each query row's scores [b, tq].
    pub lse: Tensor,
    /// Keys (queries for dk, dv) per dispatch ([`attention_chunk`]).
    pub chunk: usize,
}

/// Dropout's factor for probability (b, i, j) of an attention with `tq` queries: 0 or 1 / (1 - p), from a hash
/// of (seed, b * tq + i, j) (attention.wgsl's keep_factor; the composed form and the CPU reference use this).
pub fn dropout_factor(p: f32, seed: u64, b: usize, tq: usize, i: usize, j: usize) -> f32 {
    if p <= 0.0 {
        return 1.0;
    }
    fn mix(x: u32) -> u32 {
        let mut h = x;
        h ^= h >> 16;
        h = h.wrapping_mul(0x7feb_352d);
        h ^= h >> 15;
        h = h.wrapping_mul(0x846c_a68b);
        h ^= h >> 16;
        h
    }
    let (lo, hi) = (seed as u32, (seed >> 32) as u32);
    let h = mix(lo ^ mix(hi ^ mix((b * tq + i) as u32) ^ (j as u32).wrapping_mul(0x9e37_79b9)));
    let u = (h >> 8) as f32 * (1.0 / 16_777_216.0);
    if u >= p {
        1.0 / (1.0 - p)
    } else {
        0.0
    }
}

/// softmax(q k^T * scale + mask) v for q [b, tq, d], k [b, tk, d], v [b, tk, dv] (b counts batch x heads);
/// `scale` is 1 / sqrt(d) unless given. `causal` hides every key after the query's position (tq == tk); `mask`
/// [tq, tk] or [b, tq, tk] is added to the scores. `dropout` = (p, seed) zeroes each probability with
/// probability p (and scales the rest by 1 / (1 - p)), the same for the same seed. Fused or composed as
/// [`prefer_fused`] decides.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: Option<f32>, dropout: Option<(f32, u64)>) -> Result<Tensor> {
    check(q, k, v, mask, causal, dropout)?;
    if fusable(q, k, v, mask) && prefer_fused(q.device(), q.shape()[0] * q.shape()[1] * k.shape()[1]) {
        fused(q, k, v, mask, causal, scale_or(scale, q), dropout, attention_chunk(q.device(), q.shape()[2], v.shape()[2]))
    } else {
        attention_composed(q, k, v, mask, causal, scale, dropout)
    }
}

/// [`attention`] by the fused kernels whatever the adapter (tests and benchmarks); an error where they do not
/// apply (a head size above [`ATTN_MAX_DIM`], a mask that needs a gradient, fusion off).
pub fn attention_fused(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: Option<f32>, dropout: Option<(f32, u64)>) -> Result<Tensor> {
    attention_fused_chunked(q, k, v, mask, causal, scale, dropout, attention_chunk(q.device(), q.shape().get(2).copied().unwrap_or(0), v.shape().get(2).copied().unwrap_or(0)))
}

/// [`attention_fused`] with each dispatch covering at most `chunk` keys (and, in the backward pass's dk and dv,
/// queries), the later dispatches resuming from the earlier ones' running state: what CPU adapters need for
/// long rows ([`attention_chunk`]), here to be chosen (tests of the merge on any adapter).
#[allow(clippy::too_many_arguments)]
pub fn attention_fused_chunked(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: Option<f32>, dropout: Option<(f32, u64)>, chunk: usize) -> Result<Tensor> {
    check(q, k, v, mask, causal, dropout)?;
    if !fusable(q, k, v, mask) {
        return Err(KilnError::Usage(format!(
            "fused attention takes head sizes up to {ATTN_MAX_DIM} (q {:?}, v {:?}), a mask without a gradient, at least one key, at most 65535 batch rows, and fusion on",
            q.shape(),
            v.shape()
        )));
    }
    if chunk == 0 {
        return Err(KilnError::Usage("fused attention's chunk must hold at least one key".into()));
    }
    fused(q, k, v, mask, causal, scale_or(scale, q), dropout, chunk)
}

fn fusable(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> bool {
    crate::fusion_enabled(q.device()) && q.shape()[2] <= ATTN_MAX_DIM && v.shape()[2] <= ATTN_MAX_DIM && !mask.is_some_and(|m| m.requires_grad()) && k.shape()[1] > 0 && q.shape()[0] <= 65535
}

/// Keys per dispatch of the fused kernels on `dev` for head sizes d (q, k) and dv (v). Lavapipe (Mesa's
/// gallivm: CPU adapters) silently ends an invocation's loops after 65535 iterations in all; a fused row loops
/// over its keys (or queries) with about 2 d + dv steps each, plus the tile loads. There each dispatch covers
/// as many keys as stay under 60,000 iterations (a multiple of 16, the forward's key tile: 272 at head size
/// 64), and a longer row runs as several dispatches, each resuming from the last one's running max, sum and
/// output (the backward's gradients added). GPUs have no such cap: one dispatch.
pub fn attention_chunk(dev: &kiln_wgpu::Gpu, d: usize, dv: usize) -> usize {
    let Some(cap) = kernels::loop_cap(dev) else { return usize::MAX };
    let loops = |t: usize| t * (2 * d + dv) + (t / 8 + 1) * (d + dv) + 4 * (d + dv);
    let mut t = 16;
    while loops(t + 16) <= cap {
        t += 16;
    }
    t
}

static PREFER_FUSED_ENV: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();

/// Scores above this many bytes take the fused kernels on a CPU adapter too.
pub const CPU_FUSED_ABOVE_BYTES: usize = 256 << 20;

/// Whether [`attention`] runs fused for `scores` = b * tq * tk values: on GPUs always; on CPU adapters only when
/// the composed form's scores would pass [`CPU_FUSED_ABOVE_BYTES`] (long rows run in chunks there:
/// [`attention_chunk`]), since there the flash kernels, one scalar row per invocation, run several times
/// slower than the vectorised matmuls (measured in docs/sequence.md). The device setting "attention_fused",
/// else `KILN_ATTN_FUSED=on|off`, overrides.
pub fn prefer_fused(dev: &kiln_wgpu::Gpu, scores: usize) -> bool {
    let forced = match dev.setting("attention_fused") {
        Some(v) => Some(v != 0),
        None => *PREFER_FUSED_ENV.get_or_init(|| match std::env::var("KILN_ATTN_FUSED").as_deref() {
            Ok("on") | Ok("1") => Some(true),
            Ok("off") | Ok("0") => Some(false),
            _ => None,
        }),
    };
    forced.unwrap_or(dev.info.device_type != kiln_wgpu::wgpu::DeviceType::Cpu || 4 * scores > CPU_FUSED_ABOVE_BYTES)
}

#[allow(clippy::too_many_arguments)]
fn fused(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: f32, dropout: Option<(f32, u64)>, chunk: usize) -> Result<Tensor> {
    let (b, tq, tk, d, dv) = (q.shape()[0], q.shape()[1], k.shape()[1], q.shape()[2], v.shape()[2]);
    let mask_view = match mask {
        Some(m) => m.view(),
        None => q.device().upload(bytemuck::cast_slice(&[0f32]), "attention mask placeholder")?,
    };
    let mask_bstride = if mask.is_some_and(|m| m.rank() == 3) { tq * tk } else { 0 };
    let g = kernels::AttnGeom { batch: b, tq, tk, d, dv, causal, has_mask: mask.is_some(), mask_bstride, scale, dropout, chunk };
    let (o, lse) = kernels::attention_forward(&g, &q.view(), &k.view(), &v.view(), &mask_view)?;
    let saved = AttnSaved { q: q.clone(), k: k.clone(), v: v.clone(), mask: mask.cloned(), causal, scale, dropout, lse: Tensor::make(lse, vec![b, tq], DType::F32, None), chunk };
    Ok(Tensor::make(o, vec![b, tq, dv], DType::F32, Some(Op::Attention(Box::new(saved)))))
}

fn scale_or(scale: Option<f32>, q: &Tensor) -> f32 {
    scale.unwrap_or_else(|| 1.0 / (q.shape()[2] as f32).sqrt())
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, dropout: Option<(f32, u64)>) -> Result<()> {
    for t in [q, k, v].into_iter().chain(mask) {
        t.expect_dtype("attention", DType::F32)?;
    }
    let bad = |lhs: &[usize], rhs: &[usize], detail: String| Err(KilnError::Shape { op: "scaled_dot_product_attention", lhs: lhs.to_vec(), rhs: rhs.to_vec(), detail });
    if q.rank() != 3 || k.rank() != 3 || v.rank() != 3 || q.shape()[0] != k.shape()[0] || k.shape()[..2] != v.shape()[..2] || q.shape()[2] != k.shape()[2] {
        return bad(q.shape(), k.shape(), format!(": expects q [b, tq, d], k [b, tk, d], v [b, tk, dv] (v is {:?})", v.shape()));
    }
    let (b, tq, tk) = (q.shape()[0], q.shape()[1], k.shape()[1]);
    if causal && tq != tk {
        return bad(q.shape(), k.shape(), ": a causal mask needs as many queries as keys".into());
    }
    if let Some(m) = mask {
        if m.shape() != [tq, tk] && m.shape() != [b, tq, tk] {
            return bad(m.shape(), q.shape(), format!(": the mask must be [{tq}, {tk}] or [{b}, {tq}, {tk}]"));
        }
    }
    if let Some((p, _)) = dropout {
        if !(0.0..1.0).contains(&p) {
            return Err(KilnError::Usage(format!("attention dropout must be in [0, 1), got {p}")));
        }
    }
    Ok(())
}

/// [`attention`] with ordinary ops (matmul, softmax, matmul), whatever the fusion setting: the [b, tq, tk]
/// scores are stored. Dropout's factors come from the same hash as the fused kernels'.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: Option<f32>, dropout: Option<(f32, u64)>) -> Result<Tensor> {
    check(q, k, v, mask, causal, dropout)?;
    let scale = scale_or(scale, q);
    let (b, tq, tk) = (q.shape()[0], q.shape()[1], k.shape()[1]);
    let mut scores = q.matmul_t(k, false, true)?.scale(scale)?;
    if causal {
        let hide: Vec<f32> = (0..tq * tk).map(|i| if i % tk > i / tk { -1e9 } else { 0.0 }).collect();
        scores = scores.broadcast_add(&Tensor::from_slice_on(q.device(), &hide, &[tq, tk])?)?;
    }
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let mut p = scores.softmax(2)?;
    if let Some((drop, seed)) = dropout.filter(|(p, _)| *p > 0.0) {
        let keep: Vec<f32> = (0..b * tq * tk).map(|e| dropout_factor(drop, seed, e / (tq * tk), tq, (e / tk) % tq, e % tk)).collect();
        p = p.mul(&Tensor::from_slice_on(q.device(), &keep, &[b, tq, tk])?)?;
    }
    p.matmul(v)
}

/// The fused backward: one kernel writes dq, dk and dv side by side; they are copied apart.
pub(crate) fn fused_grads<'a>(s: &'a AttnSaved, out: &Tensor, g: &Tensor) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let (b, tq, tk, d, dv) = (s.q.shape()[0], s.q.shape()[1], s.k.shape()[1], s.q.shape()[2], s.v.shape()[2]);
    let dev = out.device();
    let mask_view = match &s.mask {
        Some(m) => m.view(),
        None => dev.upload(bytemuck::cast_slice(&[0f32]), "attention mask placeholder")?,
    };
    let mask_bstride = if s.mask.as_ref().is_some_and(|m| m.rank() == 3) { tq * tk } else { 0 };
    let geom = kernels::AttnGeom { batch: b, tq, tk, d, dv, causal: s.causal, has_mask: s.mask.is_some(), mask_bstride, scale: s.scale, dropout: s.dropout, chunk: s.chunk };
    let dqkv = kernels::attention_backward(&geom, &s.q.view(), &s.k.view(), &s.v.view(), &mask_view, &out.view(), &g.view(), &s.lse.view())?;
    let part = |offset: usize, len: usize, shape: &[usize]| -> Result<Tensor> {
        let dst = kernels::out_buffer(&dqkv, len, "attention gradient")?;
        dev.copy(&dqkv.sub(4 * offset as u64, 4 * len as u64), &dst, 4 * len as u64)?;
        Tensor::from_storage(dst, shape, DType::F32)
    };
    let (nq, nk) = (b * tq * d, b * tk * d);
    Ok(vec![(&s.q, part(0, nq, s.q.shape())?), (&s.k, part(nq, nk, s.k.shape())?), (&s.v, part(nq + nk, b * tk * dv, s.v.shape())?)])
}

/// The op's composite formula as recorded ops, for `backward_create_graph`.
pub(crate) fn composite_of(s: &AttnSaved, t: &[Tensor]) -> Result<Tensor> {
    attention_composed(&t[0], &t[1], &t[2], s.mask.as_ref(), s.causal, Some(s.scale), s.dropout)
}
