//! A character-level language model on Moby-Dick: Embedding -> LSTM -> Linear, trained with the library's
//! Trainer on next-character windows, evaluated on the book's held-out last 5% in nats and bits per character
//! beside a unigram baseline, then sampled from a prompt with a seed and a temperature.
//! `cargo run --release --example char_rnn [-- STEPS]`
use kiln::prelude::*;
use kiln_data::{load_moby_dick, split_tail, CharVocab, CharWindows, PadSequences};
use kiln_models::{EpochRecord, StepValues, Trainer};
use kiln_nn::{CellKind, Embedding, Rnn, RnnConfig, RnnState};

pub struct CharRnn {
    pub vocab: CharVocab,
    pub embed: Embedding,
    pub lstm: Rnn,
    pub head: Linear,
}

impl CharRnn {
    pub fn new(vs: &mut VarStore, vocab: CharVocab, dim: usize, hidden: usize) -> kiln::graph::Result<CharRnn> {
        let v = vocab.len();
        let embed = Embedding::new(vs, "embed", v, dim, Some(CharVocab::PAD as usize))?;
        let lstm = Rnn::new(vs, "lstm", CellKind::Lstm, dim, hidden, RnnConfig { batch_first: true, ..Default::default() })?;
        let head = Linear::new(vs, "head", hidden, v, Init::XavierUniform)?;
        Ok(CharRnn { vocab, embed, lstm, head })
    }

    /// tokens [n, t] -> logits [n * t, vocab] and the final state.
    pub fn forward(&self, tokens: &Tensor, state: Option<&RnnState>) -> kiln::graph::Result<(Tensor, RnnState)> {
        let (n, t) = (tokens.shape()[0], tokens.shape()[1]);
        let (h, state) = self.lstm.forward(&self.embed.forward_ids(tokens)?, state)?;
        Ok((self.head.forward(&h.reshape(&[n * t, self.lstm.hidden_size])?)?, state))
    }

    /// Mean cross-entropy in nats per character over `text`, in windows of `len`.
    pub fn held_out_loss(&self, text: &str, len: usize) -> kiln::graph::Result<f64> {
        let windows = CharWindows::new(self.vocab.encode(text), len).map_err(|e| KilnError::Data(e.to_string()))?;
        let loader = DataLoader::new(windows, PadSequences::default(), LoaderOptions { batch_size: 64, ..Default::default() }).map_err(|e| KilnError::Data(e.to_string()))?;
        let (mut sum, mut count) = (0.0, 0usize);
        for batch in loader.epoch(0) {
            let b = batch.map_err(|e| KilnError::Data(e.to_string()))?;
            let t = b.upload()?;
            let n = t[0].numel();
            let (logits, _) = no_grad(|| self.forward(&t[0], None))?;
            sum += no_grad(|| loss::cross_entropy(&logits, &t[2].reshape(&[n])?))?.to_scalar()? as f64 * n as f64;
            count += n;
        }
        Ok(sum / count.max(1) as f64)
    }

    /// `len` characters after `prefix`, drawn with `temperature` from a seeded generator.
    pub fn sample(&self, prefix: &str, len: usize, temperature: f32, seed: u64) -> kiln::graph::Result<String> {
        let ids = self.vocab.encode_strict(prefix).map_err(|e| KilnError::Usage(e.to_string()))?;
        if ids.is_empty() {
            return Err(KilnError::Usage("sampling needs a prefix of at least one character".into()));
        }
        let mut rng = Rng::new(seed);
        let (mut logits, mut state) = no_grad(|| self.forward(&Tensor::from_u32(&ids, &[1, ids.len()])?, None))?;
        let mut out = Vec::with_capacity(len);
        for _ in 0..len {
            let v = self.vocab.len();
            let all = logits.to_vec()?;
            let last = &all[all.len() - v..];
            let next = draw(last, temperature, &mut rng);
            out.push(next);
            (logits, state) = no_grad(|| self.forward(&Tensor::from_u32(&[next], &[1, 1])?, Some(&state)))?;
        }
        self.vocab.decode(&out).map_err(|e| KilnError::Data(e.to_string()))
    }
}

/// A token drawn from softmax(logits / temperature); the special tokens are never drawn.
fn draw(logits: &[f32], temperature: f32, rng: &mut Rng) -> u32 {
    let specials = 4;
    let scaled: Vec<f64> = logits[specials..].iter().map(|&z| z as f64 / temperature.max(1e-3) as f64).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|z| (z - max).exp()).collect();
    let mut pick = rng.uniform() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        pick -= w;
        if pick <= 0.0 {
            return (i + specials) as u32;
        }
    }
    (weights.len() - 1 + specials) as u32
}

/// The unigram baseline: held-out cross-entropy of the training text's character frequencies (add-one).
pub fn unigram_nats(train: &str, held_out: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for c in train.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let (total, kinds) = (train.chars().count() as f64, counts.len() as f64 + 1.0);
    let n = held_out.chars().count() as f64;
    held_out.chars().map(|c| -((*counts.get(&c).unwrap_or(&0) as f64 + 1.0) / (total + kinds)).ln()).sum::<f64>() / n
}

/// Trains for `steps` steps on windows of 64 characters, batch 32; returns the model and its held-out loss
/// (nats per character, on the first `eval_chars` characters of the tail).
pub fn train(steps: usize, eval_chars: usize, seed: u64) -> kiln::graph::Result<(CharRnn, f64, f64)> {
    let text = load_moby_dick(None).map_err(|e| KilnError::Data(e.to_string()))?;
    let (train_text, tail) = split_tail(&text, 0.05).map_err(|e| KilnError::Data(e.to_string()))?;
    let held_out: String = tail.chars().take(eval_chars).collect();
    let vocab = CharVocab::from_text(train_text);
    let mut vs = VarStore::new(seed);
    let model = CharRnn::new(&mut vs, vocab.clone(), 48, 128)?;
    vs.finish()?;
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 3e-3, 0.0, Schedule::constant(), steps as u64)?;
    opt.clip = Some(Clip::GlobalNorm(5.0));
    let windows = CharWindows::new(vocab.encode(train_text), 64).map_err(|e| KilnError::Data(e.to_string()))?;
    let loader =
        DataLoader::new(windows, PadSequences::default(), LoaderOptions { batch_size: 32, shuffle: Some(seed), drop_last: true, ..Default::default() }).map_err(|e| KilnError::Data(e.to_string()))?;
    let mut trainer = Trainer::new(steps.div_ceil(loader.len()), steps as u64);
    trainer.max_steps = Some(steps as u64);
    let step = |batch: &HostBatch, _: u64| {
        let t = batch.upload()?;
        let n = t[0].numel();
        let (logits, _) = model.forward(&t[0], None)?;
        let l = loss::cross_entropy(&logits, &t[2].reshape(&[n])?)?;
        opt.step(&vs, &l.backward()?)?;
        Ok(StepValues { loss: l, correct: None })
    };
    let evaluate = |t: kiln_models::EpochTally| {
        Ok(EpochRecord { epoch: t.epoch, train_loss: t.loss_sum / t.samples.max(1) as f64, train_accuracy: f64::NAN, dev_loss: 0.0, dev_metric: 0.0, lr: 3e-3, seconds: t.seconds, samples_per_s: 0.0 })
    };
    trainer.fit(&loader, step, evaluate)?;
    let loss = model.held_out_loss(&held_out, 64)?;
    Ok((model, loss, unigram_nats(train_text, &held_out)))
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(600);
    let started = std::time::Instant::now();
    let (model, loss, unigram) = train(steps, 20_000, 42)?;
    println!("{steps} steps in {:.0} s", started.elapsed().as_secs_f64());
    println!("held-out loss {loss:.3} nats/char ({:.3} bits/char); unigram baseline {unigram:.3} nats/char", loss / std::f64::consts::LN_2);
    println!("sample (temperature 0.8, seed 1): Call me{}", model.sample("Call me", 200, 0.8, 1)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_short_run_beats_the_unigram_baseline_and_samples() {
        let (model, loss, unigram) = super::train(60, 4_000, 7).expect("training");
        assert!(loss < unigram, "held-out {loss:.3} nats/char should beat the unigram baseline {unigram:.3}");
        let a = model.sample("Call me", 40, 0.8, 3).unwrap();
        assert_eq!(a, model.sample("Call me", 40, 0.8, 3).unwrap(), "the same seed, the same sample");
        assert_eq!(a.chars().count(), 40);
        assert!(model.sample("Call me \u{1F40B}", 5, 0.8, 3).unwrap_err().to_string().contains("not in the vocabulary"));
        assert!(model.sample("", 5, 0.8, 3).is_err());
    }
}
