//! Transformer building blocks as composed ops (their fused kernels come later, measured against these):
//! scaled dot-product attention, PyTorch's `nn.MultiheadAttention` and `nn.LayerNorm`.

use kiln_graph::kernels::BiasAct;
use kiln_graph::{Result, Tensor};

use crate::init::Init;
use crate::module::{shape_error, Module};
use crate::varstore::{Param, VarStore};

/// softmax(q k^T / sqrt(d) + mask) v for q [b, tq, d], k [b, tk, d], v [b, tk, dv] (b counts batch x heads).
/// `causal` hides every key after the query's position (tq == tk); `mask` [tq, tk] or [b, tq, tk] is added to
/// the scores (0 to keep, a large negative number to hide). Fused (flash-style) where it applies:
/// `kiln_graph::attention::attention`, which also takes a scale and dropout.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool) -> Result<Tensor> {
    kiln_graph::attention::attention(q, k, v, mask, causal, None, None)
}

/// PyTorch's `nn.MultiheadAttention` (bias on, no extra key/value bias): `{name}.in_proj_weight` [3E, E],
/// `{name}.in_proj_bias` [3E], `{name}.out_proj.weight` [E, E], `{name}.out_proj.bias` [E], with its
/// initialisation (Xavier uniform for the projections, zero biases). Inputs are [t, n, E], or [n, t, E] with
/// `batch_first`.
pub struct MultiheadAttention {
    pub in_proj_weight: Param,
    pub in_proj_bias: Param,
    pub out_weight: Param,
    pub out_bias: Param,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub batch_first: bool,
}

impl MultiheadAttention {
    pub fn new(vs: &mut VarStore, name: &str, embed_dim: usize, num_heads: usize, batch_first: bool) -> Result<MultiheadAttention> {
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            return Err(shape_error("MultiheadAttention", &[embed_dim, num_heads], "embed_dim must be a multiple of num_heads"));
        }
        let e = embed_dim;
        Ok(MultiheadAttention {
            in_proj_weight: vs.param(&format!("{name}.in_proj_weight"), &[3 * e, e], Init::XavierUniform, true)?,
            in_proj_bias: vs.param(&format!("{name}.in_proj_bias"), &[3 * e], Init::Zeros, false)?,
            out_weight: vs.param(&format!("{name}.out_proj.weight"), &[e, e], Init::XavierUniform, true)?,
            out_bias: vs.param(&format!("{name}.out_proj.bias"), &[e], Init::Zeros, false)?,
            embed_dim,
            num_heads,
            batch_first,
        })
    }

    /// Attention of `query` over `key` and `value`, each [t, n, E] (batch first with `batch_first`); the output
    /// has the query's shape.
    pub fn forward(&self, query: &Tensor, key: &Tensor, value: &Tensor, mask: Option<&Tensor>, causal: bool) -> Result<Tensor> {
        let e = self.embed_dim;
        for t in [query, key, value] {
            if t.rank() != 3 || t.shape()[2] != e {
                return Err(shape_error(&self.describe(), t.shape(), &format!("expects [t, n, {e}] inputs ([n, t, {e}] with batch_first)")));
            }
        }
        // To [n, t, E].
        let first = |t: &Tensor| if self.batch_first { Ok(t.clone()) } else { t.transpose(0, 1) };
        let (q, k, v) = (first(query)?, first(key)?, first(value)?);
        let (w, b) = (self.in_proj_weight.tensor()?, self.in_proj_bias.tensor()?);
        let project = |x: &Tensor, part: usize| -> Result<Tensor> {
            let (n, t) = (x.shape()[0], x.shape()[1]);
            let y = x.reshape(&[n * t, e])?.matmul_t(&w.slice(0, part * e, e)?, false, true)?.bias_act(&b.slice(0, part * e, e)?, 1, BiasAct::Identity)?;
            // [n * t, E] -> [n, t, heads, d] -> [n, heads, t, d] -> [n * heads, t, d]
            let (h, d) = (self.num_heads, e / self.num_heads);
            y.reshape(&[n, t, h, d])?.permute(&[0, 2, 1, 3])?.reshape(&[n * h, t, d])
        };
        let (n, tq) = (q.shape()[0], q.shape()[1]);
        let (qh, kh, vh) = if query.id() == key.id() && key.id() == value.id() {
            // Self-attention: one product for q, k and v, [n * t, 3E], then one permute to [3, n, heads, t, d].
            let (h, d) = (self.num_heads, e / self.num_heads);
            let qkv = q.reshape(&[n * tq, e])?.matmul_t(w, false, true)?.bias_act(b, 1, BiasAct::Identity)?;
            let qkv = qkv.reshape(&[n, tq, 3, h, d])?.permute(&[2, 0, 3, 1, 4])?;
            let part = |i: usize| qkv.slice(0, i, 1)?.reshape(&[n * h, tq, d]);
            (part(0)?, part(1)?, part(2)?)
        } else {
            (project(&q, 0)?, project(&k, 1)?, project(&v, 2)?)
        };
        let heads = scaled_dot_product_attention(&qh, &kh, &vh, mask, causal)?;
        let merged = heads.reshape(&[n, self.num_heads, tq, e / self.num_heads])?.permute(&[0, 2, 1, 3])?.reshape(&[n * tq, e])?;
        let out = merged.matmul_t(self.out_weight.tensor()?, false, true)?.bias_act(self.out_bias.tensor()?, 1, BiasAct::Identity)?.reshape(&[n, tq, e])?;
        if self.batch_first {
            Ok(out)
        } else {
            out.transpose(0, 1)
        }
    }
}

impl Module for MultiheadAttention {
    fn describe(&self) -> String {
        format!("MultiheadAttention({}, num_heads={})", self.embed_dim, self.num_heads)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![&self.in_proj_weight, &self.in_proj_bias, &self.out_weight, &self.out_bias]
    }
}

/// PyTorch's `nn.LayerNorm` over the last `normalized_shape.len()` axes: (x - mean) / sqrt(var + eps) * weight
/// + bias with the biased variance, `{name}.weight` (ones) and `{name}.bias` (zeros) of `normalized_shape`.
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub normalized_shape: Vec<usize>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(vs: &mut VarStore, name: &str, normalized_shape: &[usize]) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: vs.param(&format!("{name}.weight"), normalized_shape, Init::Constant(1.0), false)?,
            bias: vs.param(&format!("{name}.bias"), normalized_shape, Init::Zeros, false)?,
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn describe(&self) -> String {
        format!("LayerNorm({:?})", self.normalized_shape)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![&self.weight, &self.bias]
    }
    fn as_layer(&self) -> Option<&dyn crate::module::Layer> {
        Some(self)
    }
}

impl crate::module::Layer for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.normalized_shape.len();
        if x.rank() < k || x.shape()[x.rank() - k..] != self.normalized_shape[..] {
            return Err(shape_error(&self.describe(), x.shape(), "the last axes must be the normalized shape"));
        }
        layer_norm(x, self.weight.tensor()?, self.bias.tensor()?, self.eps)
    }
}

/// Layer normalisation over the last `weight.rank()` axes of x (`LayerNorm`'s formula, as a function).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    x.layer_norm(weight, bias, eps)
}

/// Sinusoidal positional encodings ("Attention is all you need"): [len, dim] with pe[p, 2i] = sin(p / 10000^(2i /
/// dim)) and pe[p, 2i + 1] = cos(the same), made on `device`.
pub fn sinusoidal_positions(device: &kiln_graph::backend::Device, len: usize, dim: usize) -> Result<Tensor> {
    let mut pe = vec![0.0f32; len * dim];
    for p in 0..len {
        for i in (0..dim).step_by(2) {
            let angle = p as f64 / 10000f64.powf(i as f64 / dim as f64);
            pe[p * dim + i] = angle.sin() as f32;
            if i + 1 < dim {
                pe[p * dim + i + 1] = angle.cos() as f32;
            }
        }
    }
    Tensor::from_slice_on(device, &pe, &[len, dim])
}

/// PyTorch's `nn.TransformerEncoderLayer` (ReLU or GELU feed-forward, dropout left out): `{name}.self_attn`,
/// `{name}.linear1` [ff, E], `{name}.linear2` [E, ff], `{name}.norm1`, `{name}.norm2`; post-norm by default
/// (x = norm1(x + attn(x)); x = norm2(x + ff(x))), pre-norm with `norm_first` (x = x + attn(norm1(x)); x = x +
/// ff(norm2(x))). Inputs [n, t, E] (batch first).
pub struct TransformerEncoderLayer {
    pub self_attn: MultiheadAttention,
    pub linear1: crate::module::Linear,
    pub linear2: crate::module::Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub activation: crate::module::Activation,
    pub norm_first: bool,
}

impl TransformerEncoderLayer {
    pub fn new(vs: &mut VarStore, name: &str, d_model: usize, heads: usize, feedforward: usize, activation: crate::module::Activation, norm_first: bool) -> Result<TransformerEncoderLayer> {
        Ok(TransformerEncoderLayer {
            self_attn: MultiheadAttention::new(vs, &format!("{name}.self_attn"), d_model, heads, true)?,
            linear1: crate::module::Linear::new(vs, &format!("{name}.linear1"), d_model, feedforward, Init::HeUniform)?,
            linear2: crate::module::Linear::new(vs, &format!("{name}.linear2"), feedforward, d_model, Init::XavierUniform)?,
            norm1: LayerNorm::new(vs, &format!("{name}.norm1"), &[d_model])?,
            norm2: LayerNorm::new(vs, &format!("{name}.norm2"), &[d_model])?,
            activation,
            norm_first,
        })
    }

    /// x [n, t, E] -> [n, t, E]; `causal` for a decoder-only language model, `mask` as in attention.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, causal: bool) -> Result<Tensor> {
        use crate::module::Layer;
        let (n, t, e) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let attn = |y: &Tensor| self.self_attn.forward(y, y, y, mask, causal);
        let ff = |y: &Tensor| -> Result<Tensor> {
            let h = self.activation.forward(&self.linear1.forward(&y.reshape(&[n * t, e])?)?)?;
            self.linear2.forward(&h)?.reshape(&[n, t, e])
        };
        if self.norm_first {
            let x = x.add(&attn(&self.norm1.forward(x)?)?)?;
            x.add(&ff(&self.norm2.forward(&x)?)?)
        } else {
            let x = self.norm1.forward(&x.add(&attn(x)?)?)?;
            self.norm2.forward(&x.add(&ff(&x)?)?)
        }
    }
}

impl Module for TransformerEncoderLayer {
    fn describe(&self) -> String {
        format!("TransformerEncoderLayer({}, heads={}, norm_first={})", self.self_attn.embed_dim, self.self_attn.num_heads, self.norm_first)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("self_attn".into(), &self.self_attn), ("linear1".into(), &self.linear1), ("linear2".into(), &self.linear2), ("norm1".into(), &self.norm1), ("norm2".into(), &self.norm2)]
    }
}

/// The additive mask [n, tq, s] that hides each sequence's keys past its length (0 to keep, -1e9 to hide).
pub fn key_padding_mask(device: &kiln_graph::backend::Device, lengths: &[usize], tq: usize, s: usize) -> Result<Tensor> {
    let n = lengths.len();
    let m: Vec<f32> = (0..n * tq * s).map(|i| if i % s < lengths[i / (tq * s)] { 0.0 } else { -1e9 }).collect();
    Tensor::from_slice_on(device, &m, &[n, tq, s])
}

/// Bahdanau's additive attention for seq2seq: score(q, k) = v . tanh(W_q q + W_k k), softmax over the keys
/// (masked), context = weights . values. `{name}.query.weight` [A, Dq], `{name}.key.weight` [A, Dk] (no
/// biases), `{name}.v` [A].
pub struct AdditiveAttention {
    pub query: Param,
    pub key: Param,
    pub v: Param,
}

impl AdditiveAttention {
    pub fn new(vs: &mut VarStore, name: &str, query_dim: usize, key_dim: usize, attn_dim: usize) -> Result<AdditiveAttention> {
        let k = 1.0 / (attn_dim as f32).sqrt();
        Ok(AdditiveAttention {
            query: vs.param(&format!("{name}.query.weight"), &[attn_dim, query_dim], Init::XavierUniform, true)?,
            key: vs.param(&format!("{name}.key.weight"), &[attn_dim, key_dim], Init::XavierUniform, true)?,
            v: vs.param(&format!("{name}.v"), &[attn_dim], Init::Uniform { lo: -k, hi: k }, true)?,
        })
    }

    /// queries [n, tq, Dq], keys [n, s, Dk], values [n, s, Dv], an additive mask [n, tq, s] -> (context [n, tq,
    /// Dv], weights [n, tq, s]).
    pub fn forward(&self, queries: &Tensor, keys: &Tensor, values: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (n, tq, s) = (queries.shape()[0], queries.shape()[1], keys.shape()[1]);
        let a = self.v.tensor()?.numel();
        let project = |x: &Tensor, w: &Param, t: usize| -> Result<Tensor> { x.reshape(&[n * t, x.shape()[2]])?.matmul_t(w.tensor()?, false, true)?.reshape(&[n, t, a]) };
        // [n, tq, 1, A] + [n, 1, s, A] -> tanh -> . v -> [n, tq, s]
        let q = project(queries, &self.query, tq)?.reshape(&[n, tq, 1, a])?;
        let k = project(keys, &self.key, s)?.reshape(&[n, 1, s, a])?;
        let mut scores = q.broadcast_add(&k)?.tanh()?.reshape(&[n * tq * s, a])?.matmul(&self.v.tensor()?.reshape(&[a, 1])?)?.reshape(&[n, tq, s])?;
        if let Some(m) = mask {
            scores = scores.add(m)?;
        }
        let weights = scores.softmax(2)?;
        Ok((weights.matmul(values)?, weights))
    }
}

impl Module for AdditiveAttention {
    fn describe(&self) -> String {
        format!("AdditiveAttention(attn_dim={})", self.v.tensor().map(|t| t.numel()).unwrap_or(0))
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![&self.query, &self.key, &self.v]
    }
}

/// Luong's multiplicative attention for seq2seq, the "general" score q^T W_a k (`{name}.weight` [Dq, Dk], no
/// bias), or "dot" q^T k without parameters; softmax over the keys (masked), context = weights . values. Runs
/// as one `attention` op (q = the queries, k = the keys through W_a, scale 1).
pub struct MultiplicativeAttention {
    pub weight: Option<Param>,
}

impl MultiplicativeAttention {
    /// The general form, W_a [query_dim, key_dim].
    pub fn general(vs: &mut VarStore, name: &str, query_dim: usize, key_dim: usize) -> Result<MultiplicativeAttention> {
        Ok(MultiplicativeAttention { weight: Some(vs.param(&format!("{name}.weight"), &[query_dim, key_dim], Init::XavierUniform, true)?) })
    }
    /// The dot form (queries and keys of one size).
    pub fn dot() -> MultiplicativeAttention {
        MultiplicativeAttention { weight: None }
    }

    /// keys [n, s, Dk] as the scores see them: W_a k (general) or k (dot), [n, s, Dq]. Computed once per source
    /// when a decoder attends step by step.
    pub fn project_keys(&self, keys: &Tensor) -> Result<Tensor> {
        match &self.weight {
            None => Ok(keys.clone()),
            Some(w) => {
                let (n, s, dk) = (keys.shape()[0], keys.shape()[1], keys.shape()[2]);
                let w = w.tensor()?;
                keys.reshape(&[n * s, dk])?.matmul_t(w, false, true)?.reshape(&[n, s, w.shape()[0]])
            }
        }
    }

    /// queries [n, tq, Dq], keys already through [`MultiplicativeAttention::project_keys`], values [n, s, Dv],
    /// an additive mask [n, tq, s] -> context [n, tq, Dv].
    pub fn context(&self, queries: &Tensor, projected_keys: &Tensor, values: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        kiln_graph::attention::attention(queries, projected_keys, values, mask, false, Some(1.0), None)
    }

    /// The weights [n, tq, s] (composed; for attention maps).
    pub fn weights(&self, queries: &Tensor, projected_keys: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut scores = queries.matmul_t(projected_keys, false, true)?;
        if let Some(m) = mask {
            scores = scores.add(m)?;
        }
        scores.softmax(2)
    }
}

impl Module for MultiplicativeAttention {
    fn describe(&self) -> String {
        format!("MultiplicativeAttention({})", if self.weight.is_some() { "general" } else { "dot" })
    }
    fn own_params(&self) -> Vec<&Param> {
        self.weight.iter().collect()
    }
}

/// PyTorch's `nn.TransformerDecoderLayer` (ReLU or GELU feed-forward, dropout left out): `{name}.self_attn`,
/// `{name}.multihead_attn` (cross-attention over the encoder's output, the "memory"), `{name}.linear1`,
/// `{name}.linear2`, `{name}.norm1`..`norm3`; post-norm by default (x = norm1(x + self_attn(x)); x = norm2(x +
/// cross_attn(x, memory)); x = norm3(x + ff(x))), pre-norm with `norm_first`. Inputs batch first.
pub struct TransformerDecoderLayer {
    pub self_attn: MultiheadAttention,
    pub multihead_attn: MultiheadAttention,
    pub linear1: crate::module::Linear,
    pub linear2: crate::module::Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
    pub activation: crate::module::Activation,
    pub norm_first: bool,
}

impl TransformerDecoderLayer {
    pub fn new(vs: &mut VarStore, name: &str, d_model: usize, heads: usize, feedforward: usize, activation: crate::module::Activation, norm_first: bool) -> Result<TransformerDecoderLayer> {
        Ok(TransformerDecoderLayer {
            self_attn: MultiheadAttention::new(vs, &format!("{name}.self_attn"), d_model, heads, true)?,
            multihead_attn: MultiheadAttention::new(vs, &format!("{name}.multihead_attn"), d_model, heads, true)?,
            linear1: crate::module::Linear::new(vs, &format!("{name}.linear1"), d_model, feedforward, Init::HeUniform)?,
            linear2: crate::module::Linear::new(vs, &format!("{name}.linear2"), feedforward, d_model, Init::XavierUniform)?,
            norm1: LayerNorm::new(vs, &format!("{name}.norm1"), &[d_model])?,
            norm2: LayerNorm::new(vs, &format!("{name}.norm2"), &[d_model])?,
            norm3: LayerNorm::new(vs, &format!("{name}.norm3"), &[d_model])?,
            activation,
            norm_first,
        })
    }

    /// x [n, t, E] (the target so far) and memory [n, s, E] -> [n, t, E]. `causal` masks x's self-attention (as
    /// `tgt_is_causal`); `memory_mask` [t, s] or [n * heads, t, s] is added to the cross-attention's scores
    /// (padding of the source).
    pub fn forward(&self, x: &Tensor, memory: &Tensor, causal: bool, memory_mask: Option<&Tensor>) -> Result<Tensor> {
        use crate::module::Layer;
        if x.rank() != 3 || memory.rank() != 3 || x.shape()[0] != memory.shape()[0] || x.shape()[2] != memory.shape()[2] {
            return Err(shape_error(&self.describe(), x.shape(), &format!("expects x [n, t, E] and memory [n, s, E] (memory is {:?})", memory.shape())));
        }
        let (n, t, e) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let sa = |y: &Tensor| self.self_attn.forward(y, y, y, None, causal);
        let ca = |y: &Tensor| self.multihead_attn.forward(y, memory, memory, memory_mask, false);
        let ff = |y: &Tensor| -> Result<Tensor> {
            let h = self.activation.forward(&self.linear1.forward(&y.reshape(&[n * t, e])?)?)?;
            self.linear2.forward(&h)?.reshape(&[n, t, e])
        };
        if self.norm_first {
            let x = x.add(&sa(&self.norm1.forward(x)?)?)?;
            let x = x.add(&ca(&self.norm2.forward(&x)?)?)?;
            x.add(&ff(&self.norm3.forward(&x)?)?)
        } else {
            let x = self.norm1.forward(&x.add(&sa(x)?)?)?;
            let x = self.norm2.forward(&x.add(&ca(&x)?)?)?;
            self.norm3.forward(&x.add(&ff(&x)?)?)
        }
    }
}

impl Module for TransformerDecoderLayer {
    fn describe(&self) -> String {
        format!("TransformerDecoderLayer({}, heads={}, norm_first={})", self.self_attn.embed_dim, self.self_attn.num_heads, self.norm_first)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("self_attn".into(), &self.self_attn),
            ("multihead_attn".into(), &self.multihead_attn),
            ("linear1".into(), &self.linear1),
            ("linear2".into(), &self.linear2),
            ("norm1".into(), &self.norm1),
            ("norm2".into(), &self.norm2),
            ("norm3".into(), &self.norm3),
        ]
    }
}
