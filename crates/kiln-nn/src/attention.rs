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
