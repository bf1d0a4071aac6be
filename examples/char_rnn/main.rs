//! A character-level language model on Moby-Dick: Embedding -> LSTM -> Linear (kiln_models::lm::CharLm, the
//! model `kiln train char-rnn` trains), trained here with a loop of the library's Trainer on next-character
//! windows, evaluated on the book's held-out last 5% in nats and bits per character
//! beside a unigram baseline, then sampled from a prompt with a seed and a temperature.
//! `cargo run --release --example char_rnn [-- STEPS]`
use kiln::prelude::*;
use kiln_data::{load_moby_dick, split_tail, CharVocab, CharWindows, PadSequences};
use kiln_models::lm::{CharLm, CharLmShape};
use kiln_models::{EpochRecord, StepValues, Trainer};
use kiln_nn::CellKind;

/// The unigram baseline: held-out cross-entropy of the training text's character frequencies (add-one).
pub fn unigram_nats(train: &str, held_out: &str) -> f64 {
    kiln_models::lm::ngram_nats(train, held_out, 1, 1.0)
}

/// Trains for `steps` steps on windows of 64 characters, batch 32; returns the model and its held-out loss
/// (nats per character, on the first `eval_chars` characters of the tail).
pub fn train(steps: usize, eval_chars: usize, seed: u64) -> kiln::graph::Result<(CharLm, f64, f64)> {
    let text = load_moby_dick(None).map_err(|e| KilnError::Data(e.to_string()))?;
    let (train_text, tail) = split_tail(&text, 0.05).map_err(|e| KilnError::Data(e.to_string()))?;
    let held_out: String = tail.chars().take(eval_chars).collect();
    let vocab = CharVocab::from_text(train_text);
    let mut vs = VarStore::new(seed);
    // The model `kiln train char-rnn` trains (kiln_models::lm), with this example's own loop.
    let model = CharLm::new(&mut vs, vocab.clone(), CharLmShape { cell: CellKind::Lstm, dim: 48, hidden: 128, layers: 1 })?;
    vs.finish()?;
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 3e-3, 0.0, Schedule::constant(), steps as u64)?;
    opt.clip = Some(Clip::GlobalNorm(5.0));
    let windows = CharWindows::new(vocab.encode(train_text), 64).map_err(|e| KilnError::Data(e.to_string()))?;
    let loader =
        DataLoader::new(windows, PadSequences::default(), LoaderOptions { batch_size: 32, shuffle: Some(seed), drop_last: true, ..Default::default() }).map_err(|e| KilnError::Data(e.to_string()))?;
    let mut trainer = Trainer::new(steps.div_ceil(loader.len()), steps as u64);
    trainer.max_steps = Some(steps as u64);
    let step = |batch: &HostBatch, _: u64| {
        let l = model.batch_loss(batch)?;
        opt.step(&vs, &l.backward()?)?;
        Ok(StepValues { loss: l, correct: None })
    };
    let evaluate = |t: kiln_models::EpochTally| {
        Ok(EpochRecord { epoch: t.epoch, train_loss: t.loss_sum / t.samples.max(1) as f64, train_accuracy: f64::NAN, dev_loss: 0.0, dev_metric: 0.0, lr: 3e-3, seconds: t.seconds, samples_per_s: 0.0 })
    };
    trainer.fit(&loader, step, evaluate)?;
    let loss = model.nats_per_char(&held_out, 64)?;
    Ok((model, loss, unigram_nats(train_text, &held_out)))
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(600);
    let started = std::time::Instant::now();
    let (model, loss, unigram) = train(steps, 20_000, 42)?;
    println!("{steps} steps in {:.0} s", started.elapsed().as_secs_f64());
    println!("held-out loss {loss:.3} nats/char ({:.3} bits/char); unigram baseline {unigram:.3} nats/char", loss / std::f64::consts::LN_2);
    println!("sample (temperature 0.8, seed 1): Call me{}", model.sample("Call me", 200, 0.8, None, 1)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_short_run_beats_the_unigram_baseline_and_samples() {
        let (model, loss, unigram) = super::train(60, 4_000, 7).expect("training");
        assert!(loss < unigram, "held-out {loss:.3} nats/char should beat the unigram baseline {unigram:.3}");
        let a = model.sample("Call me", 40, 0.8, None, 3).unwrap();
        assert_eq!(a, model.sample("Call me", 40, 0.8, None, 3).unwrap(), "the same seed, the same sample");
        assert_eq!(a.chars().count(), 40);
        assert!(model.sample("Call me \u{1F40B}", 5, 0.8, None, 3).unwrap_err().to_string().contains("not in the vocabulary"));
        assert!(model.sample("", 5, 0.8, None, 3).is_err());
    }
}
