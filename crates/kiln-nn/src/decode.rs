//! Decoding a sequence model's outputs: temperature and top-k sampling with a seed, greedy decoding, and beam
//! search with length normalisation, stopping at `<eos>`. Each works on the host from the logits (or
//! log-probabilities) the model returns per step, so any model can use them.

use kiln_graph::{Result, Rng};

/// A token drawn from softmax(logits / temperature), among the `top_k` most likely when given (ties to the
/// lower id); `temperature` 0 is greedy.
pub fn sample(logits: &[f32], temperature: f32, top_k: Option<usize>, rng: &mut Rng) -> usize {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(top_k.unwrap_or(logits.len()).clamp(1, logits.len().max(1)));
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / temperature as f64).exp()).collect();
    let mut pick = rng.uniform() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        pick -= w;
        if pick <= 0.0 {
            return i;
        }
    }
    *order.last().unwrap_or(&0)
}

/// The most likely token (the first of ties).
pub fn argmax(logits: &[f32]) -> usize {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

/// log softmax of one row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max + logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

/// A finished or live hypothesis of beam search.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// The tokens after the prompt (the `<eos>` included when it ended there).
    pub tokens: Vec<u32>,
    pub log_prob: f64,
    pub finished: bool,
}

impl Hypothesis {
    /// log_prob / length^alpha: alpha 0 compares raw probabilities (favouring short outputs), 1 per-token ones.
    pub fn score(&self, alpha: f64) -> f64 {
        self.log_prob / (self.tokens.len().max(1) as f64).powf(alpha)
    }
}

/// Beam search: `step(prefixes)` returns the next token's logits for each live prefix (each prefix is the
/// tokens decoded so far). Each step keeps the `width` best continuations by probability; one that ends at
/// `eos` is finished. Stops when `width` have finished, none is live, or after `max_len` tokens; returns the
/// `width` best, finished or not, by length-normalised score (`alpha`).
pub fn beam_search(width: usize, max_len: usize, eos: u32, alpha: f64, mut step: impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>) -> Result<Vec<Hypothesis>> {
    let width = width.max(1);
    let mut live = vec![Hypothesis { tokens: Vec::new(), log_prob: 0.0, finished: false }];
    let mut done: Vec<Hypothesis> = Vec::new();
    for _ in 0..max_len {
        let prefixes: Vec<Vec<u32>> = live.iter().map(|h| h.tokens.clone()).collect();
        let logits = step(&prefixes)?;
        let mut candidates = Vec::new();
        for (h, row) in live.iter().zip(&logits) {
            for (t, lp) in log_softmax(row).into_iter().enumerate() {
                let mut tokens = h.tokens.clone();
                tokens.push(t as u32);
                candidates.push(Hypothesis { tokens, log_prob: h.log_prob + lp, finished: t as u32 == eos });
            }
        }
        // Best first by probability so far; ties by the tokens, so the result does not depend on sort details.
        candidates.sort_by(|a, b| b.log_prob.total_cmp(&a.log_prob).then_with(|| a.tokens.cmp(&b.tokens)));
        // The `width` best continuations form the next beam; those that ended at <eos> leave it finished.
        live.clear();
        for c in candidates.into_iter().take(width) {
            if c.finished {
                done.push(c);
            } else {
                live.push(c);
            }
        }
        if done.len() >= width || live.is_empty() {
            break;
        }
    }
    done.extend(live);
    done.sort_by(|a, b| b.score(alpha).total_cmp(&a.score(alpha)).then_with(|| a.tokens.cmp(&b.tokens)));
    done.truncate(width);
    Ok(done)
}

/// Greedy decoding of `n` sequences at once: `step` gets each sequence's last token (`start` first) and
/// returns the next-token logits [n * vocab]; a sequence ends at the first token for which `ends` is true (not
/// kept), or after `max_len` tokens. Finished sequences keep being fed their last token until all end.
pub fn greedy_batch(n: usize, vocab: usize, max_len: usize, start: u32, ends: impl Fn(u32) -> bool, mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>) -> Result<Vec<Vec<u32>>> {
    let (mut out, mut done, mut input) = (vec![Vec::new(); n], vec![false; n], vec![start; n]);
    for _ in 0..max_len {
        let all = step(&input)?;
        for i in 0..n {
            let id = argmax(&all[i * vocab..(i + 1) * vocab]) as u32;
            if !done[i] {
                if ends(id) {
                    done[i] = true;
                } else {
                    out[i].push(id);
                }
            }
            input[i] = id;
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(out)
}
