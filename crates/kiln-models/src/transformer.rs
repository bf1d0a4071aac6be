//! Decoder-only Transformers: token embedding plus learned positions, pre-norm causal blocks (PyTorch's
//! `nn.TransformerEncoderLayer` with `norm_first` and GELU, a causal mask), a final LayerNorm and a linear head.
//! The model of `char-transformer` and of the sequence-reversal task (`reversal`).

use kiln_graph::{KilnError, Result, Tensor};
use kiln_nn::{Activation, Embedding, Init, Layer, LayerNorm, Linear, Module, Param, TransformerEncoderLayer, VarStore};
use serde::Serialize;

/// Sizes of a [`TransformerLm`], saved in its checkpoint's metadata.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct TransformerLmShape {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
    pub feedforward: usize,
    /// Positions in the learned table: the longest sequence the model reads.
    pub max_len: usize,
}

/// `embed` [vocab, d] and `pos` [max_len, d] (learned positions, both N(0, 0.02) as GPT-2), `blocks.{i}`,
/// `norm`, `head` [vocab, d].
pub struct TransformerLm {
    pub shape: TransformerLmShape,
    pub embed: Embedding,
    pub pos: Embedding,
    pub blocks: Vec<TransformerEncoderLayer>,
    pub norm: LayerNorm,
    pub head: Linear,
}

impl TransformerLm {
    pub fn new(vs: &mut VarStore, shape: TransformerLmShape) -> Result<TransformerLm> {
        let d = shape.d_model;
        let embed = Embedding::new(vs, "embed", shape.vocab, d, None)?;
        let pos = Embedding::new(vs, "pos", shape.max_len, d, None)?;
        // N(0, 1) from the store's seed, scaled to N(0, 0.02).
        for table in [&embed.weight, &pos.weight] {
            vs.edit_initial(table, |w| w.iter_mut().for_each(|v| *v *= 0.02))?;
        }
        let blocks = (0..shape.layers).map(|i| TransformerEncoderLayer::new(vs, &format!("blocks.{i}"), d, shape.heads, shape.feedforward, Activation::Gelu, true)).collect::<Result<_>>()?;
        Ok(TransformerLm { shape, embed, pos, blocks, norm: LayerNorm::new(vs, "norm", &[d])?, head: Linear::new(vs, "head", d, shape.vocab, Init::XavierUniform)? })
    }

    /// tokens [n, t] (u32) -> logits [n * t, vocab]; position i sees tokens 0..=i only. A sequence longer than
    /// the positional table is an error saying so.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        if tokens.rank() != 2 {
            return Err(KilnError::Shape { op: "TransformerLm", lhs: tokens.shape().to_vec(), rhs: vec![], detail: ": expects tokens [n, t]".into() });
        }
        let (n, t, d) = (tokens.shape()[0], tokens.shape()[1], self.shape.d_model);
        if t > self.shape.max_len {
            return Err(KilnError::Usage(format!("a sequence of {t} tokens is longer than the model's positional table of {} positions", self.shape.max_len)));
        }
        let positions = Tensor::from_u32_on(tokens.device(), &(0..t as u32).collect::<Vec<_>>(), &[t])?;
        let mut x = self.embed.forward_ids(tokens)?.broadcast_add(&self.pos.forward_ids(&positions)?)?;
        for block in &self.blocks {
            x = block.forward(&x, None, true)?;
        }
        self.head.forward(&self.norm.forward(&x)?.reshape(&[n * t, d])?)
    }
}

impl Module for TransformerLm {
    fn describe(&self) -> String {
        let s = &self.shape;
        format!("TransformerLm(vocab={}, d_model={}, heads={}, layers={}, feedforward={}, max_len={})", s.vocab, s.d_model, s.heads, s.layers, s.feedforward, s.max_len)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("embed".into(), &self.embed), ("pos".into(), &self.pos)];
        v.extend(self.blocks.iter().enumerate().map(|(i, b)| (format!("blocks.{i}"), b as &dyn Module)));
        v.push(("norm".into(), &self.norm));
        v.push(("head".into(), &self.head));
        v
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
}

/// A character-level [`TransformerLm`] with its vocabulary: what `char-transformer` trains and samples.
pub struct CharTransformer {
    pub vocab: kiln_data::CharVocab,
    pub net: TransformerLm,
}

impl crate::lm::WindowModel for CharTransformer {
    fn vocab(&self) -> &kiln_data::CharVocab {
        &self.vocab
    }
    fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        self.net.forward(tokens)
    }
    fn sample(&self, prefix: &str, len: usize, temperature: f32, top_k: Option<usize>, seed: u64) -> Result<String> {
        crate::lm::sample_windowed(self, self.net.shape.max_len, prefix, len, temperature, top_k, seed)
    }
}
