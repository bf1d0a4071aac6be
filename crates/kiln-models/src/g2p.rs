//! `g2p`: grapheme-to-phoneme translation on the CMU Pronouncing Dictionary, the sequence-to-sequence task.
//! An encoder-decoder: a bidirectional LSTM reads the word's letters, an LSTM writes its phonemes (teacher
//! forcing in training) starting from the encoder's final states, and with `attention` each decoder state
//! attends over the encoder's states in Luong's "general" form (score = h_t W_a h_s, a padding mask over the
//! letters), h~ = tanh(W_c [context; h_t]) feeding the output layer. Without attention the decoder state feeds
//! it directly: the baseline the issue asks for. [`G2pTransformer`] is the Transformer encoder-decoder for the
//! same task; both implement [`Seq2Seq`], which training and evaluation use.
//!
//! Phonemes are ARPAbet without stress digits (39 symbols); a word's alternates all count as correct. Words of
//! letters and apostrophes only, split by a seeded shuffle into train, dev and test (no word in two). Word
//! error rate: the share of test words whose output is none of their pronunciations; phoneme error rate: edit
//! distance to the nearest pronunciation over its length, summed over the words.

use std::collections::HashMap;
use std::time::Instant;

use kiln_data::{Collate, DataLoader, Dataset, HostArray, HostBatch, LoaderOptions, Pronunciations};
use kiln_graph::backend::Device;
use kiln_graph::{loss, no_grad, KilnError, Result, Tensor};
use kiln_nn::{key_padding_mask, CellKind, Embedding, Init, Layer, Linear, Module, MultiplicativeAttention, Param, Rnn, RnnConfig, RnnState, VarStore};
use serde::Serialize;

use crate::trainer::Progress;

pub const PAD: u32 = 0;
pub const SOS: u32 = 1;
pub const EOS: u32 = 2;
const SPECIALS: u32 = 3;

fn data_err(e: kiln_data::DataError) -> KilnError {
    KilnError::Data(e.to_string())
}

/// Letters and phonemes as token ids (0 `<pad>`, 1 `<sos>`, 2 `<eos>`, then the symbols in sorted order).
#[derive(Clone, Debug)]
pub struct G2pVocab {
    pub letters: Vec<char>,
    pub phonemes: Vec<String>,
}

impl G2pVocab {
    pub fn letter_ids(&self, word: &str) -> Option<Vec<u32>> {
        word.chars().map(|c| self.letters.binary_search(&c).ok().map(|i| i as u32 + SPECIALS)).collect()
    }
    pub fn phoneme_ids(&self, phones: &[String]) -> Option<Vec<u32>> {
        phones.iter().map(|p| self.phonemes.binary_search(p).ok().map(|i| i as u32 + SPECIALS)).collect()
    }
    pub fn phoneme_names(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().filter(|&&i| i >= SPECIALS).filter_map(|&i| self.phonemes.get((i - SPECIALS) as usize).cloned()).collect()
    }
}

/// A word's letters and its pronunciations as ids.
#[derive(Clone, Debug)]
pub struct G2pEntry {
    pub word: String,
    pub letters: Vec<u32>,
    pub variants: Vec<Vec<u32>>,
}

/// The vocabulary and the train, dev and test words.
pub type G2pSplit = (G2pVocab, Vec<G2pEntry>, Vec<G2pEntry>, Vec<G2pEntry>);

/// The dictionary, stress removed, filtered to letters and apostrophes, split by seed into (train, dev, test)
/// with `held` words in each of dev and test, and the vocabulary of the training words.
pub fn prepare(dict: &[Pronunciations], held: usize, seed: u64) -> Result<G2pSplit> {
    let strip = |p: &str| p.trim_end_matches(|c: char| c.is_ascii_digit()).to_string();
    let words: Vec<(String, Vec<Vec<String>>)> = dict
        .iter()
        .filter(|p| p.word.chars().all(|c| c.is_ascii_lowercase() || c == '\''))
        .map(|p| {
            let mut variants: Vec<Vec<String>> = Vec::new();
            for v in &p.variants {
                let v: Vec<String> = v.iter().map(|x| strip(x)).collect();
                if !variants.contains(&v) {
                    variants.push(v);
                }
            }
            (p.word.clone(), variants)
        })
        .collect();
    let names: Vec<String> = words.iter().map(|w| w.0.clone()).collect();
    let (train_names, rest) = kiln_data::split_words(&names, (2 * held) as f64 / names.len().max(1) as f64, seed).map_err(data_err)?;
    let by_word: HashMap<&str, &Vec<Vec<String>>> = words.iter().map(|(w, v)| (w.as_str(), v)).collect();
    let mut letters: Vec<char> = train_names.iter().flat_map(|w| w.chars()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    letters.sort();
    let phonemes: Vec<String> = train_names.iter().flat_map(|w| by_word[w.as_str()].iter().flatten().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let vocab = G2pVocab { letters, phonemes };
    let entries = |ws: &[String]| -> Vec<G2pEntry> {
        ws.iter()
            .filter_map(|w| {
                let letters = vocab.letter_ids(w)?;
                let variants: Vec<Vec<u32>> = by_word[w.as_str()].iter().filter_map(|v| vocab.phoneme_ids(v)).collect();
                (!variants.is_empty()).then(|| G2pEntry { word: w.clone(), letters, variants })
            })
            .collect()
    };
    let (dev_names, test_names) = rest.split_at(rest.len() / 2);
    let (train, dev, test) = (entries(&train_names), entries(dev_names), entries(test_names));
    Ok((vocab, train, dev, test))
}

/// Training pairs: each pronunciation of each word is a sample.
pub struct G2pPairs {
    pairs: Vec<(Vec<u32>, Vec<u32>)>,
}

impl G2pPairs {
    pub fn new(entries: &[G2pEntry]) -> G2pPairs {
        G2pPairs { pairs: entries.iter().flat_map(|e| e.variants.iter().map(|v| (e.letters.clone(), v.clone()))).collect() }
    }
}

impl Dataset for G2pPairs {
    type Sample = (Vec<u32>, Vec<u32>);
    fn len(&self) -> usize {
        self.pairs.len()
    }
    fn get(&self, i: usize) -> kiln_data::Result<(Vec<u32>, Vec<u32>)> {
        self.pairs.get(i).cloned().ok_or_else(|| kiln_data::DataError::Invalid(format!("pair {i} of {}", self.pairs.len())))
    }
}

/// "source" [n, S] (padded letters), "source_lengths" [n], "decoder_input" [n, T] (`<sos>` then the
/// phonemes) and "targets" [n, T] (the phonemes then `<eos>`), padded with `<pad>`.
pub struct PadPairs;

impl Collate<(Vec<u32>, Vec<u32>)> for PadPairs {
    fn collate(&self, samples: Vec<(Vec<u32>, Vec<u32>)>) -> kiln_data::Result<Vec<HostArray>> {
        let n = samples.len();
        let s = samples.iter().map(|p| p.0.len()).max().unwrap_or(1).max(1);
        let t = samples.iter().map(|p| p.1.len() + 1).max().unwrap_or(1);
        let pad = |v: Vec<u32>, len: usize| v.into_iter().chain(std::iter::repeat(PAD)).take(len).collect::<Vec<u32>>();
        let (mut src, mut lens, mut dec, mut tgt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (letters, phones) in samples {
            lens.push(letters.len() as u32);
            src.extend(pad(letters, s));
            dec.extend(pad(std::iter::once(SOS).chain(phones.iter().copied()).collect(), t));
            tgt.extend(pad(phones.into_iter().chain(std::iter::once(EOS)).collect(), t));
        }
        Ok(vec![
            HostArray::u32("source", vec![n, s], src),
            HostArray::u32("source_lengths", vec![n], lens),
            HostArray::u32("decoder_input", vec![n, t], dec),
            HostArray::u32("targets", vec![n, t], tgt),
        ])
    }
}

/// Sizes of a [`G2p`] model.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct G2pShape {
    pub dim: usize,
    /// Per encoder direction; the decoder has twice this.
    pub hidden: usize,
    pub attention: bool,
    /// The Transformer encoder-decoder instead of the LSTMs (`dim`, `hidden` and `attention` unused).
    pub transformer: Option<G2pTransformerShape>,
}

/// The encoder-decoder (names: `letters`, `phonemes` (embeddings), `encoder` (bidirectional LSTM), `decoder`
/// (LSTM), `attn` (W_a, no bias), `combine` (W_c), `out`).
pub struct G2p {
    pub vocab: G2pVocab,
    pub shape: G2pShape,
    pub letters: Embedding,
    pub phonemes: Embedding,
    pub encoder: Rnn,
    pub decoder: Rnn,
    pub attn: Option<MultiplicativeAttention>,
    pub combine: Option<Linear>,
    pub out: Linear,
}

/// What the encoder hands the decoder: its states [n, S, 2H], their projection by W_a (with attention), the
/// letters' lengths and the decoder's initial state.
pub struct Encoded {
    pub states: Tensor,
    pub keys: Option<Tensor>,
    pub lengths: Vec<usize>,
    pub init: RnnState,
}

impl G2p {
    pub fn new(vs: &mut VarStore, vocab: G2pVocab, shape: G2pShape) -> Result<G2p> {
        let (h2, lv, pv) = (2 * shape.hidden, vocab.letters.len() + SPECIALS as usize, vocab.phonemes.len() + SPECIALS as usize);
        Ok(G2p {
            letters: Embedding::new(vs, "letters", lv, shape.dim, Some(PAD as usize))?,
            phonemes: Embedding::new(vs, "phonemes", pv, shape.dim, Some(PAD as usize))?,
            encoder: Rnn::new(vs, "encoder", CellKind::Lstm, shape.dim, shape.hidden, RnnConfig { bidirectional: true, batch_first: true, ..Default::default() })?,
            decoder: Rnn::new(vs, "decoder", CellKind::Lstm, shape.dim, h2, RnnConfig { batch_first: true, ..Default::default() })?,
            attn: if shape.attention { Some(MultiplicativeAttention::general(vs, "attn", h2, h2)?) } else { None },
            combine: if shape.attention { Some(Linear::new(vs, "combine", 2 * h2, h2, Init::XavierUniform)?) } else { None },
            out: Linear::new(vs, "out", h2, pv, Init::XavierUniform)?,
            vocab,
            shape,
        })
    }

    /// source [n, S] with `lengths` -> what the decoder needs.
    pub fn encode(&self, source: &Tensor, lengths: &[usize]) -> Result<Encoded> {
        let (n, s) = (source.shape()[0], source.shape()[1]);
        let (states, st) = self.encoder.forward_lengths(&self.letters.forward_ids(source)?, Some(lengths), None)?;
        // The decoder starts from both directions' final states side by side: [1, n, 2H].
        let join = |t: &Tensor| -> Result<Tensor> { Tensor::concat(&[&t.slice(0, 0, 1)?, &t.slice(0, 1, 1)?], 2) };
        let init = RnnState { h: join(&st.h)?, c: st.c.as_ref().map(join).transpose()? };
        let keys = self.attn.as_ref().map(|a| a.project_keys(&states)).transpose()?;
        debug_assert_eq!(states.shape()[..2], [n, s]);
        Ok(Encoded { states, keys, lengths: lengths.to_vec(), init })
    }

    /// Decoder inputs [n, T] from `state` -> (logits [n * T, phonemes], the decoder's state after them).
    pub fn decode(&self, enc: &Encoded, input: &Tensor, state: &RnnState) -> Result<(Tensor, RnnState)> {
        let (n, t, h2) = (input.shape()[0], input.shape()[1], 2 * self.shape.hidden);
        let (dec, state) = self.decoder.forward(&self.phonemes.forward_ids(input)?, Some(state))?;
        let features = match (&enc.keys, &self.attn, &self.combine) {
            (Some(keys), Some(attn), Some(combine)) => {
                let mask = key_padding_mask(dec.device(), &enc.lengths, t, keys.shape()[1])?;
                let context = attn.context(&dec, keys, &enc.states, Some(&mask))?;
                let both = Tensor::concat(&[&context, &dec], 2)?.reshape(&[n * t, 2 * h2])?;
                combine.forward(&both)?.tanh()?
            }
            _ => dec.reshape(&[n * t, h2])?,
        };
        Ok((self.out.forward(&features)?, state))
    }

    /// The attention weights [n, T, S] of a batch (for the maps), composed.
    pub fn attention_weights(&self, source: &Tensor, lengths: &[usize], input: &Tensor) -> Result<Option<Vec<f32>>> {
        let enc = self.encode(source, lengths)?;
        let (Some(keys), Some(attn)) = (&enc.keys, &self.attn) else { return Ok(None) };
        let (dec, _) = self.decoder.forward(&self.phonemes.forward_ids(input)?, Some(&enc.init))?;
        let mask = key_padding_mask(dec.device(), lengths, dec.shape()[1], keys.shape()[1])?;
        Ok(Some(attn.weights(&dec, keys, Some(&mask))?.to_vec()?))
    }

    /// The mean cross-entropy of a collated batch (padding ignored).
    pub fn batch_loss(&self, batch: &HostBatch) -> Result<Tensor> {
        let t = batch.upload()?;
        let lengths = lengths_of(batch)?;
        let enc = self.encode(&t[0], &lengths)?;
        let (logits, _) = self.decode(&enc, &t[2], &enc.init)?;
        let opts = loss::CrossEntropyOptions { ignore_index: Some(PAD), label_smoothing: 0.0 };
        loss::cross_entropy_with(&logits, &t[3].reshape(&[t[3].numel()])?, opts)
    }

    /// Greedy decoding of a batch of words, at most `max_len` phonemes each.
    pub fn greedy(&self, words: &[&G2pEntry], max_len: usize) -> Result<Vec<Vec<u32>>> {
        no_grad(|| {
            let (source, lengths) = source_batch(words)?;
            let enc = self.encode(&source, &lengths)?;
            let (n, v) = (words.len(), self.vocab.phonemes.len() + SPECIALS as usize);
            let mut state = enc.init.clone();
            kiln_nn::decode::greedy_batch(
                n,
                v,
                max_len,
                SOS,
                |id| id == EOS || id < SPECIALS,
                |input| {
                    let (logits, next_state) = self.decode(&enc, &Tensor::from_u32(input, &[n, 1])?, &state)?;
                    state = next_state;
                    logits.to_vec()
                },
            )
        })
    }

    /// Beam search for one word (width `width`, length normalisation `alpha`), the best hypothesis.
    pub fn beam(&self, word: &G2pEntry, width: usize, alpha: f64, max_len: usize) -> Result<Vec<u32>> {
        no_grad(|| {
            let v = self.vocab.phonemes.len() + SPECIALS as usize;
            // The word is encoded once per beam size (the first step has one hypothesis, the rest `width`).
            let mut encoded: Option<(usize, Encoded)> = None;
            let hyps = kiln_nn::decode::beam_search(width, max_len, EOS, alpha, |prefixes| {
                let w = prefixes.len();
                if encoded.as_ref().is_none_or(|(n, _)| *n != w) {
                    let (source, lengths) = source_batch(&vec![word; w])?;
                    encoded = Some((w, self.encode(&source, &lengths)?));
                }
                let enc = &encoded.as_ref().expect("encoded just above").1;
                let t = prefixes[0].len() + 1;
                let input: Vec<u32> = prefixes.iter().flat_map(|p| std::iter::once(SOS).chain(p.iter().copied())).collect();
                let (logits, _) = self.decode(enc, &Tensor::from_u32(&input, &[w, t])?, &enc.init)?;
                Ok(last_rows(&logits.to_vec()?, w, t, v))
            })?;
            Ok(hyps.first().map(|h| h.tokens.iter().copied().filter(|&t| t != EOS).collect()).unwrap_or_default())
        })
    }
}

impl Module for G2p {
    fn describe(&self) -> String {
        format!("G2p(dim={}, hidden={}, attention={})", self.shape.dim, self.shape.hidden, self.shape.attention)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("letters".into(), &self.letters), ("phonemes".into(), &self.phonemes), ("encoder".into(), &self.encoder), ("decoder".into(), &self.decoder)];
        if let Some(a) = &self.attn {
            v.push(("attn".into(), a));
        }
        if let Some(c) = &self.combine {
            v.push(("combine".into(), c));
        }
        v.push(("out".into(), &self.out));
        v
    }
}

/// The last position's logits of each of `w` decoded prefixes of length `t` (logits [w * t, v]), with `<pad>`
/// and `<sos>` made impossible (never written): what beam search extends.
fn last_rows(all: &[f32], w: usize, t: usize, v: usize) -> Vec<Vec<f32>> {
    (0..w)
        .map(|i| {
            let mut row = all[(i * t + t - 1) * v..(i * t + t) * v].to_vec();
            row[PAD as usize] = f32::NEG_INFINITY;
            row[SOS as usize] = f32::NEG_INFINITY;
            row
        })
        .collect()
}

fn lengths_of(batch: &HostBatch) -> Result<Vec<usize>> {
    match batch.arrays.iter().find(|a| a.name == "source_lengths").map(|a| &a.data) {
        Some(kiln_data::HostData::U32(l)) => Ok(l.iter().map(|&v| v as usize).collect()),
        _ => Err(KilnError::Data("a g2p batch without source_lengths".into())),
    }
}

fn source_batch(words: &[&G2pEntry]) -> Result<(Tensor, Vec<usize>)> {
    let s = words.iter().map(|w| w.letters.len()).max().unwrap_or(1).max(1);
    let ids: Vec<u32> = words.iter().flat_map(|w| w.letters.iter().copied().chain(std::iter::repeat(PAD)).take(s)).collect();
    Ok((Tensor::from_u32(&ids, &[words.len(), s])?, words.iter().map(|w| w.letters.len()).collect()))
}

/// Levenshtein distance between two token sequences.
pub fn edit_distance(a: &[u32], b: &[u32]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + (x != y) as usize).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// (word error rate, phoneme error rate) of `outputs` against each word's pronunciations: a word is right when
/// its output is one of them; its phoneme errors are the edit distance to the nearest, over that one's length.
pub fn error_rates(words: &[G2pEntry], outputs: &[Vec<u32>]) -> (f64, f64) {
    let (mut wrong, mut edits, mut phones) = (0usize, 0usize, 0usize);
    for (w, out) in words.iter().zip(outputs) {
        let (d, len) = w.variants.iter().map(|v| (edit_distance(out, v), v.len())).min().unwrap_or((0, 0));
        wrong += (d > 0) as usize;
        edits += d;
        phones += len;
    }
    (wrong as f64 / words.len().max(1) as f64, edits as f64 / phones.max(1) as f64)
}

/// What `kiln train g2p` sets.
#[derive(Clone, Debug)]
pub struct G2pConfig {
    pub shape: G2pShape,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub seed: u64,
    /// Words in each of dev and test.
    pub held: usize,
    /// Test words decoded greedily, and with beam search (the first of them).
    pub eval_words: usize,
    pub beam_words: usize,
    pub beam_width: usize,
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for G2pConfig {
    fn default() -> Self {
        G2pConfig {
            shape: G2pShape { dim: 64, hidden: 128, attention: true, transformer: None },
            batch_size: 128,
            steps: 2500,
            lr: 3e-3,
            seed: 42,
            held: 3000,
            eval_words: 3000,
            beam_words: 500,
            beam_width: 4,
            data_dir: None,
        }
    }
}

/// What a `g2p` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct G2pReport {
    pub model: String,
    pub adapter: String,
    pub shape: G2pShape,
    pub steps: u64,
    pub train_words: usize,
    pub test_words: usize,
    pub greedy_wer: f64,
    pub greedy_per: f64,
    pub beam_words: usize,
    pub beam_width: usize,
    pub beam_wer: f64,
    pub beam_per: f64,
    /// Greedy on the same words as the beam, for a like-for-like comparison.
    pub greedy_wer_on_beam_words: f64,
    pub examples: Vec<(String, String)>,
    pub parameters: usize,
    pub seconds: f64,
    pub ms_per_step: f64,
}

/// The Transformer's default sizes: d_model 128, 4 heads, 2 + 2 layers, feed-forward 512.
pub const G2P_TRANSFORMER: G2pTransformerShape = G2pTransformerShape { d_model: 128, heads: 4, layers: 2, feedforward: 512 };

impl G2pConfig {
    /// The Transformer's defaults: [`G2P_TRANSFORMER`], Adam at 1e-3 (a usual Transformer rate, below the LSTMs' 3e-3),
    /// the rest as the LSTMs.
    pub fn transformer() -> G2pConfig {
        let d = G2pConfig::default();
        G2pConfig { shape: G2pShape { transformer: Some(G2P_TRANSFORMER), ..d.shape }, lr: 1e-3, ..d }
    }
}

/// Trains with teacher forcing and evaluates on held-out words, greedy and beam.
pub fn train_g2p(cfg: &G2pConfig, progress: impl FnMut(&Progress)) -> Result<(Box<dyn Seq2Seq>, G2pReport, Vec<G2pEntry>)> {
    let started = Instant::now();
    let device = Device::current()?;
    let dict = kiln_data::load_cmudict(cfg.data_dir.as_deref()).map_err(data_err)?;
    let (vocab, train, _dev, test) = prepare(&dict, cfg.held, cfg.seed)?;
    let mut vs = VarStore::new(cfg.seed);
    let model: Box<dyn Seq2Seq> = match cfg.shape.transformer {
        Some(t) => Box::new(G2pTransformer::new(&mut vs, vocab, t)?),
        None => Box::new(G2p::new(&mut vs, vocab, cfg.shape)?),
    };
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, cfg.lr, cfg.steps, Some(5.0))?;
    let pairs = G2pPairs::new(&train);
    let options = LoaderOptions { batch_size: cfg.batch_size, shuffle: Some(cfg.seed), drop_last: true, ..Default::default() };
    let loader = DataLoader::new(pairs, PadPairs, options).map_err(data_err)?;
    let fit = crate::trainer::fit_steps(&loader, cfg.steps, cfg.lr, started, progress, &mut opt, &vs, |b| model.batch_loss(b))?;
    let eval: Vec<G2pEntry> = test.iter().take(cfg.eval_words).cloned().collect();
    let mut greedy = Vec::with_capacity(eval.len());
    for chunk in eval.chunks(500) {
        greedy.extend(model.greedy(&chunk.iter().collect::<Vec<_>>(), 30)?);
    }
    let (greedy_wer, greedy_per) = error_rates(&eval, &greedy);
    let beam_set = &eval[..cfg.beam_words.min(eval.len())];
    let beams = beam_set.iter().map(|w| model.beam(w, cfg.beam_width, 1.0, 30)).collect::<Result<Vec<_>>>()?;
    let (beam_wer, beam_per) = error_rates(beam_set, &beams);
    let greedy_wer_on_beam_words = error_rates(beam_set, &greedy[..beam_set.len()]).0;
    let examples = eval.iter().zip(&greedy).take(10).map(|(w, g)| (w.word.clone(), model.vocab().phoneme_names(g).join(" "))).collect();
    let report = G2pReport {
        model: match (cfg.shape.transformer, cfg.shape.attention) {
            (Some(_), _) => "g2p (transformer)",
            (None, true) => "g2p (attention)",
            (None, false) => "g2p (no attention)",
        }
        .into(),
        adapter: device.adapter_name(),
        shape: cfg.shape,
        steps: fit.steps,
        train_words: train.len(),
        test_words: eval.len(),
        greedy_wer,
        greedy_per,
        beam_words: beam_set.len(),
        beam_width: cfg.beam_width,
        beam_wer,
        beam_per,
        greedy_wer_on_beam_words,
        examples,
        parameters: vs.num_values(),
        seconds: started.elapsed().as_secs_f64(),
        ms_per_step: 1000.0 * fit.step_seconds / fit.steps.max(1) as f64,
    };
    Ok((model, report, eval))
}

/// Attention maps of the first `count` words as PNGs in `dir` (`attention-{word}.png`: a row per written
/// phoneme, its end included, a column per letter), and the labels of each.
pub fn attention_maps(model: &dyn Seq2Seq, words: &[G2pEntry], outputs: &[Vec<u32>], count: usize, dir: &std::path::Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| KilnError::Io { path: dir.display().to_string(), message: e.to_string() })?;
    let mut written = Vec::new();
    for (w, out) in words.iter().zip(outputs).take(count) {
        let input: Vec<u32> = std::iter::once(SOS).chain(out.iter().copied()).collect();
        let (source, lengths) = source_batch(&[w])?;
        let Some(weights) = no_grad(|| model.attention_weights(&source, &lengths, &Tensor::from_u32(&input, &[1, input.len()])?))? else {
            return Ok(written);
        };
        let path = dir.join(format!("attention-{}.png", w.word.replace('\'', "_")));
        crate::plot::heatmap_png(&path, input.len(), w.letters.len(), &weights, 24).map_err(|e| KilnError::Io { path: path.display().to_string(), message: e.to_string() })?;
        let mut phones = model.vocab().phoneme_names(out);
        phones.push("<eos>".into());
        written.push(format!("{}: rows {} / columns {}", path.display(), phones.join(" "), w.word));
    }
    Ok(written)
}

/// A g2p model of either kind, as training, evaluation and the attention maps use it.
pub trait Seq2Seq: Module {
    fn vocab(&self) -> &G2pVocab;
    /// The mean cross-entropy of a collated batch (padding ignored).
    fn batch_loss(&self, batch: &HostBatch) -> Result<Tensor>;
    /// Greedy decoding of a batch of words, at most `max_len` phonemes each.
    fn greedy(&self, words: &[&G2pEntry], max_len: usize) -> Result<Vec<Vec<u32>>>;
    /// Beam search for one word (width `width`, length normalisation `alpha`), the best hypothesis.
    fn beam(&self, word: &G2pEntry, width: usize, alpha: f64, max_len: usize) -> Result<Vec<u32>>;
    /// The attention weights [n, T, S] of a batch, where the model has a single map to show.
    fn attention_weights(&self, _source: &Tensor, _lengths: &[usize], _input: &Tensor) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
}

impl Seq2Seq for G2p {
    fn vocab(&self) -> &G2pVocab {
        &self.vocab
    }
    fn batch_loss(&self, batch: &HostBatch) -> Result<Tensor> {
        G2p::batch_loss(self, batch)
    }
    fn greedy(&self, words: &[&G2pEntry], max_len: usize) -> Result<Vec<Vec<u32>>> {
        G2p::greedy(self, words, max_len)
    }
    fn beam(&self, word: &G2pEntry, width: usize, alpha: f64, max_len: usize) -> Result<Vec<u32>> {
        G2p::beam(self, word, width, alpha, max_len)
    }
    fn attention_weights(&self, source: &Tensor, lengths: &[usize], input: &Tensor) -> Result<Option<Vec<f32>>> {
        G2p::attention_weights(self, source, lengths, input)
    }
}

/// Sizes of a [`G2pTransformer`].
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct G2pTransformerShape {
    pub d_model: usize,
    pub heads: usize,
    /// Encoder layers, and as many decoder layers.
    pub layers: usize,
    pub feedforward: usize,
}

/// Letters and phonemes are at most this long (the positional table).
pub const MAX_POSITIONS: usize = 64;

/// The Transformer encoder-decoder ("Attention is all you need", pre-norm): token embeddings times sqrt(d)
/// plus sinusoidal positions; `encoder.{i}` (`TransformerEncoderLayer`, the letters' padding masked), a final
/// `encoder_norm`; `decoder.{i}` (`TransformerDecoderLayer`, causal self-attention, cross-attention over the
/// encoder's output with the same padding masked), `decoder_norm`, `out`. GELU feed-forward, no dropout.
pub struct G2pTransformer {
    pub vocab: G2pVocab,
    pub shape: G2pTransformerShape,
    pub letters: Embedding,
    pub phonemes: Embedding,
    pub encoder: Vec<kiln_nn::TransformerEncoderLayer>,
    pub encoder_norm: kiln_nn::LayerNorm,
    pub decoder: Vec<kiln_nn::TransformerDecoderLayer>,
    pub decoder_norm: kiln_nn::LayerNorm,
    pub out: Linear,
}

/// The encoder's output [n, S, d] and the letters' lengths.
pub struct Memory {
    pub states: Tensor,
    pub lengths: Vec<usize>,
}

impl G2pTransformer {
    pub fn new(vs: &mut VarStore, vocab: G2pVocab, shape: G2pTransformerShape) -> Result<G2pTransformer> {
        let (d, lv, pv) = (shape.d_model, vocab.letters.len() + SPECIALS as usize, vocab.phonemes.len() + SPECIALS as usize);
        let act = kiln_nn::Activation::Gelu;
        let letters = Embedding::new(vs, "letters", lv, d, Some(PAD as usize))?;
        let phonemes = Embedding::new(vs, "phonemes", pv, d, Some(PAD as usize))?;
        // N(0, 1 / d), so that times sqrt(d) the embeddings are of the positions' size.
        for table in [&letters.weight, &phonemes.weight] {
            vs.edit_initial(table, |w| w.iter_mut().for_each(|v| *v /= (d as f32).sqrt()))?;
        }
        Ok(G2pTransformer {
            encoder: (0..shape.layers).map(|i| kiln_nn::TransformerEncoderLayer::new(vs, &format!("encoder.{i}"), d, shape.heads, shape.feedforward, act, true)).collect::<Result<_>>()?,
            encoder_norm: kiln_nn::LayerNorm::new(vs, "encoder_norm", &[d])?,
            decoder: (0..shape.layers).map(|i| kiln_nn::TransformerDecoderLayer::new(vs, &format!("decoder.{i}"), d, shape.heads, shape.feedforward, act, true)).collect::<Result<_>>()?,
            decoder_norm: kiln_nn::LayerNorm::new(vs, "decoder_norm", &[d])?,
            out: Linear::new(vs, "out", d, pv, Init::XavierUniform)?,
            letters,
            phonemes,
            vocab,
            shape,
        })
    }

    /// ids [n, t] -> embeddings times sqrt(d) plus positions, [n, t, d].
    fn embed(&self, table: &Embedding, ids: &Tensor) -> Result<Tensor> {
        let t = ids.shape()[1];
        if t > MAX_POSITIONS {
            return Err(KilnError::Usage(format!("a sequence of {t} tokens is longer than the g2p Transformer's {MAX_POSITIONS} positions")));
        }
        let pe = kiln_nn::sinusoidal_positions(ids.device(), t, self.shape.d_model)?;
        table.forward_ids(ids)?.scale((self.shape.d_model as f32).sqrt())?.broadcast_add(&pe)
    }

    /// The additive mask [n * heads, tq, s] hiding each word's padded letters.
    fn padding_mask(&self, device: &Device, lengths: &[usize], tq: usize, s: usize) -> Result<Tensor> {
        let h = self.shape.heads;
        let m: Vec<f32> = (0..lengths.len() * h * tq * s).map(|i| if i % s < lengths[i / (h * tq * s)] { 0.0 } else { -1e9 }).collect();
        Tensor::from_slice_on(device, &m, &[lengths.len() * h, tq, s])
    }

    /// source [n, S] with `lengths` -> the memory.
    pub fn encode(&self, source: &Tensor, lengths: &[usize]) -> Result<Memory> {
        let s = source.shape()[1];
        let mask = self.padding_mask(source.device(), lengths, s, s)?;
        let mut x = self.embed(&self.letters, source)?;
        for layer in &self.encoder {
            x = layer.forward(&x, Some(&mask), false)?;
        }
        Ok(Memory { states: kiln_nn::Layer::forward(&self.encoder_norm, &x)?, lengths: lengths.to_vec() })
    }

    /// Decoder inputs [n, T] -> logits [n * T, phonemes]; position t sees inputs 0..=t only.
    pub fn decode(&self, memory: &Memory, input: &Tensor) -> Result<Tensor> {
        let (n, t, s) = (input.shape()[0], input.shape()[1], memory.states.shape()[1]);
        let mask = self.padding_mask(input.device(), &memory.lengths, t, s)?;
        let mut x = self.embed(&self.phonemes, input)?;
        for layer in &self.decoder {
            x = layer.forward(&x, &memory.states, true, Some(&mask))?;
        }
        self.out.forward(&kiln_nn::Layer::forward(&self.decoder_norm, &x)?.reshape(&[n * t, self.shape.d_model])?)
    }
}

impl Module for G2pTransformer {
    fn describe(&self) -> String {
        let s = &self.shape;
        format!("G2pTransformer(d_model={}, heads={}, layers={}+{}, feedforward={})", s.d_model, s.heads, s.layers, s.layers, s.feedforward)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("letters".into(), &self.letters), ("phonemes".into(), &self.phonemes)];
        v.extend(self.encoder.iter().enumerate().map(|(i, l)| (format!("encoder.{i}"), l as &dyn Module)));
        v.push(("encoder_norm".into(), &self.encoder_norm));
        v.extend(self.decoder.iter().enumerate().map(|(i, l)| (format!("decoder.{i}"), l as &dyn Module)));
        v.push(("decoder_norm".into(), &self.decoder_norm));
        v.push(("out".into(), &self.out));
        v
    }
}

impl Seq2Seq for G2pTransformer {
    fn vocab(&self) -> &G2pVocab {
        &self.vocab
    }
    fn batch_loss(&self, batch: &HostBatch) -> Result<Tensor> {
        let t = batch.upload()?;
        let memory = self.encode(&t[0], &lengths_of(batch)?)?;
        let logits = self.decode(&memory, &t[2])?;
        let opts = loss::CrossEntropyOptions { ignore_index: Some(PAD), label_smoothing: 0.0 };
        loss::cross_entropy_with(&logits, &t[3].reshape(&[t[3].numel()])?, opts)
    }
    fn greedy(&self, words: &[&G2pEntry], max_len: usize) -> Result<Vec<Vec<u32>>> {
        if words.is_empty() {
            return Ok(Vec::new());
        }
        no_grad(|| {
            let (source, lengths) = source_batch(words)?;
            let memory = self.encode(&source, &lengths)?;
            let (n, v) = (words.len(), self.vocab.phonemes.len() + SPECIALS as usize);
            let mut prefixes: Vec<Vec<u32>> = vec![vec![SOS]; n];
            let mut done = vec![false; n];
            // The whole prefix is decoded again each step (no key/value cache): words are short.
            for _ in 0..max_len.min(MAX_POSITIONS - 1) {
                let t = prefixes[0].len();
                let input: Vec<u32> = prefixes.iter().flatten().copied().collect();
                let all = self.decode(&memory, &Tensor::from_u32(&input, &[n, t])?)?.to_vec()?;
                for (i, p) in prefixes.iter_mut().enumerate() {
                    let id = kiln_nn::decode::argmax(&all[(i * t + t - 1) * v..(i * t + t) * v]) as u32;
                    done[i] |= id == EOS || id < SPECIALS;
                    p.push(if done[i] { PAD } else { id });
                }
                if done.iter().all(|&d| d) {
                    break;
                }
            }
            Ok(prefixes.into_iter().map(|p| p.into_iter().skip(1).take_while(|&id| id >= SPECIALS).collect()).collect())
        })
    }
    fn beam(&self, word: &G2pEntry, width: usize, alpha: f64, max_len: usize) -> Result<Vec<u32>> {
        no_grad(|| {
            let v = self.vocab.phonemes.len() + SPECIALS as usize;
            let mut encoded: Option<(usize, Memory)> = None;
            let hyps = kiln_nn::decode::beam_search(width, max_len.min(MAX_POSITIONS - 1), EOS, alpha, |prefixes| {
                let w = prefixes.len();
                if encoded.as_ref().is_none_or(|(n, _)| *n != w) {
                    let (source, lengths) = source_batch(&vec![word; w])?;
                    encoded = Some((w, self.encode(&source, &lengths)?));
                }
                let memory = &encoded.as_ref().expect("encoded just above").1;
                let t = prefixes[0].len() + 1;
                let input: Vec<u32> = prefixes.iter().flat_map(|p| std::iter::once(SOS).chain(p.iter().copied())).collect();
                Ok(last_rows(&self.decode(memory, &Tensor::from_u32(&input, &[w, t])?)?.to_vec()?, w, t, v))
            })?;
            Ok(hyps.first().map(|h| h.tokens.iter().copied().filter(|&t| t != EOS).collect()).unwrap_or_default())
        })
    }
}
