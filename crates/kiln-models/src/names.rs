//! `names`: a character-level GRU that generates first names (Embedding -> GRU -> Linear, the [`CharLm`] of
//! char-rnn), trained on whole names (`<sos> name` -> `name <eos>`) from a seeded split of the shipped lists.
//! Reported: the held-out names' loss in nats per character (each name's characters and its end), beside an
//! add-k character trigram on the same split, and the share of 1,000 seeded samples that are new names (in
//! neither split's training half).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use kiln_data::{load_first_names, split_words, CharVocab, DataLoader, LoaderOptions, PadSequences, WordSequences};
use kiln_graph::backend::Device;
use kiln_graph::{no_grad, KilnError, Rng, Tensor};
use kiln_nn::schedule::Schedule;
use kiln_nn::{CellKind, Clip, Optimizer, OptimizerKind, VarStore};
use serde::Serialize;

use crate::lm::{ngram_nats, CharLm, CharLmShape};
use crate::trainer::Progress;

type Result<T, E = KilnError> = std::result::Result<T, E>;

fn data_err(e: kiln_data::DataError) -> KilnError {
    KilnError::Data(e.to_string())
}

/// What `kiln train names` sets.
#[derive(Clone, Debug)]
pub struct NamesConfig {
    pub shape: CharLmShape,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub seed: u64,
    /// The held-out share of the distinct names.
    pub held_out: f64,
    /// Names sampled for the novelty figure, and their temperature.
    pub samples: usize,
    pub temperature: f32,
    pub out_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
}

impl Default for NamesConfig {
    fn default() -> Self {
        NamesConfig {
            shape: CharLmShape { cell: CellKind::Gru, dim: 32, hidden: 128, layers: 1 },
            batch_size: 64,
            steps: 1500,
            lr: 3e-3,
            seed: 42,
            held_out: 0.1,
            samples: 1000,
            temperature: 1.0,
            out_dir: None,
            data_dir: None,
        }
    }
}

/// What a `names` run measured (the `--json` line).
#[derive(Clone, Debug, Serialize)]
pub struct NamesReport {
    pub model: String,
    pub dataset: String,
    pub adapter: String,
    pub shape: CharLmShape,
    pub steps: u64,
    pub train_names: usize,
    pub held_out_names: usize,
    pub held_out_nats_per_char: f64,
    pub held_out_bits_per_char: f64,
    /// Add-k (0.1) character trigram on the same split, names joined by newlines (the newline is `<eos>`).
    pub trigram_nats_per_char: f64,
    pub samples: usize,
    /// Samples that are not training names.
    pub new_share: f64,
    /// Samples that are held-out names (real names the model never saw).
    pub held_out_share: f64,
    /// Distinct samples over all samples.
    pub distinct_share: f64,
    pub examples: Vec<String>,
    pub parameters: usize,
    pub seconds: f64,
    pub ms_per_step: f64,
}

/// Mean cross-entropy per predicted token (characters and `<eos>`) of `words`.
pub fn nats_per_char(model: &CharLm, words: &[String]) -> Result<f64> {
    let data = WordSequences::new(words, &model.vocab).map_err(data_err)?;
    let loader = DataLoader::new(data, PadSequences { pad: CharVocab::PAD }, LoaderOptions { batch_size: 256, ..Default::default() }).map_err(data_err)?;
    let (mut sum, mut count) = (0.0, 0usize);
    for batch in loader.epoch(0) {
        let batch = batch.map_err(data_err)?;
        // Each word predicts its characters and its end: length (with <sos>) tokens.
        let tokens: usize = match batch.arrays.iter().find(|a| a.name == "lengths").map(|a| &a.data) {
            Some(kiln_data::HostData::U32(l)) => l.iter().map(|&l| l as usize).sum(),
            _ => return Err(KilnError::Data("a batch of words without lengths".into())),
        };
        sum += no_grad(|| model.batch_loss_unpadded(&batch))?.to_scalar()? as f64 * tokens as f64;
        count += tokens;
    }
    Ok(sum / count.max(1) as f64)
}

/// `count` words drawn from `<sos>` until `<eos>` (at most `max_len` characters), all at once as one batch, with
/// `temperature` and a generator seeded with `seed`; `<pad>`, `<sos>` and `<unk>` are never drawn.
pub fn sample_words(model: &CharLm, count: usize, temperature: f32, seed: u64, max_len: usize) -> Result<Vec<String>> {
    let mut rng = Rng::new(seed);
    let v = model.vocab.len();
    let mut words: Vec<Vec<u32>> = vec![Vec::new(); count];
    let mut done = vec![false; count];
    let (mut logits, mut state) = no_grad(|| model.forward(&Tensor::from_u32(&vec![CharVocab::SOS; count], &[count, 1])?, None))?;
    for _ in 0..=max_len {
        let all = logits.to_vec()?;
        let mut next = vec![CharVocab::PAD; count];
        for i in 0..count {
            let mut row = all[i * v..(i + 1) * v].to_vec();
            for special in [CharVocab::PAD, CharVocab::SOS, CharVocab::UNK] {
                row[special as usize] = f32::NEG_INFINITY;
            }
            let id = kiln_nn::decode::sample(&row, temperature, None, &mut rng) as u32;
            if done[i] {
                continue;
            }
            if id == CharVocab::EOS || words[i].len() == max_len {
                done[i] = true;
            } else {
                words[i].push(id);
                next[i] = id;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        (logits, state) = no_grad(|| model.forward(&Tensor::from_u32(&next, &[count, 1])?, Some(&state)))?;
    }
    words.iter().map(|w| model.vocab.decode(w).map_err(data_err)).collect()
}

/// Trains, evaluates, samples and (with `out_dir`) saves `last.safetensors` and `vocab.json`.
pub fn train_names(cfg: &NamesConfig, progress: impl FnMut(&Progress)) -> Result<NamesReport> {
    let started = Instant::now();
    let device = Device::current()?;
    let names = load_first_names(cfg.data_dir.as_deref()).map_err(data_err)?;
    let (train, held) = split_words(&names, cfg.held_out, cfg.seed).map_err(data_err)?;
    let vocab = CharVocab::from_text(&train.concat());
    let mut vs = VarStore::new(cfg.seed);
    let text_model = crate::lm::TextModel::new(&mut vs, vocab.clone(), crate::lm::LmShape::Recurrent(cfg.shape))?;
    let crate::lm::TextModel::Recurrent(model) = &text_model else { unreachable!("a recurrent shape makes a recurrent model") };
    vs.finish()?;
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, cfg.lr, 0.0, Schedule::constant(), cfg.steps)?;
    opt.clip = Some(Clip::GlobalNorm(5.0));
    let data = WordSequences::new(&train, &vocab).map_err(data_err)?;
    let options = LoaderOptions { batch_size: cfg.batch_size, shuffle: Some(cfg.seed), drop_last: true, ..Default::default() };
    let loader = DataLoader::new(data, PadSequences { pad: CharVocab::PAD }, options).map_err(data_err)?;
    let fit = crate::trainer::fit_steps(&loader, cfg.steps, cfg.lr, started, progress, &mut opt, &vs, |b| model.batch_loss_unpadded(b))?;
    let nats = nats_per_char(model, &held)?;
    if let Some(dir) = &cfg.out_dir {
        crate::lm::save_text_model(&vs, &text_model, ("names", "names"), cfg.seed, dir)?;
    }
    let samples = sample_words(model, cfg.samples, cfg.temperature, cfg.seed, 24)?;
    let (train_set, held_set): (HashSet<&str>, HashSet<&str>) = (train.iter().map(String::as_str).collect(), held.iter().map(String::as_str).collect());
    let share = |f: &dyn Fn(&str) -> bool| samples.iter().filter(|s| f(s)).count() as f64 / samples.len().max(1) as f64;
    let joined = |w: &[String]| format!("\n{}\n", w.join("\n"));
    Ok(NamesReport {
        model: "names".into(),
        dataset: "names".into(),
        adapter: device.adapter_name(),
        shape: cfg.shape,
        steps: fit.steps,
        train_names: train.len(),
        held_out_names: held.len(),
        held_out_nats_per_char: nats,
        held_out_bits_per_char: nats / std::f64::consts::LN_2,
        trigram_nats_per_char: ngram_nats(&joined(&train), &joined(&held)[1..], 3, 0.1),
        samples: samples.len(),
        new_share: share(&|s| !s.is_empty() && !train_set.contains(s)),
        held_out_share: share(&|s| held_set.contains(s)),
        distinct_share: samples.iter().collect::<HashSet<_>>().len() as f64 / samples.len().max(1) as f64,
        examples: samples.iter().take(12).cloned().collect(),
        parameters: vs.num_values(),
        seconds: started.elapsed().as_secs_f64(),
        ms_per_step: 1000.0 * fit.step_seconds / fit.steps.max(1) as f64,
    })
}
