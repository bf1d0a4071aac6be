//! Sequence reversal, the classic check that a Transformer can route information by position: a tiny
//! decoder-only [`TransformerLm`] reads `<sos> x1 .. xL <sep>` and writes `xL .. x1 <eos>` (digits, L from 2 to
//! 20, seeded). Only the written half is scored (the read half's targets are `<pad>`, ignored by the loss).
//!
//! Exact match is measured teacher-forced: a sequence counts when the argmax at every written position is the
//! target. That is the same as greedy decoding's exact match: if every teacher-forced argmax is right, greedy
//! decoding feeds back exactly the targets and writes them; if one is wrong, greedy decoding first goes wrong
//! there.

use std::time::Instant;

use kiln_data::{DataLoader, Dataset, HostBatch, HostData, LoaderOptions, PadSequences, Sequence};
use kiln_graph::backend::Device;
use kiln_graph::{loss, no_grad, KilnError, Result, Rng};
use kiln_nn::schedule::{LrSchedule, Schedule};
use kiln_nn::{Clip, Optimizer, OptimizerKind, VarStore};
use serde::Serialize;

use crate::trainer::{EpochRecord, OnProgress, Progress, StepValues, Trainer};
use crate::transformer::{TransformerLm, TransformerLmShape};

pub const PAD: u32 = 0;
pub const SOS: u32 = 1;
pub const EOS: u32 = 2;
pub const SEP: u32 = 3;
/// Digit d is token FIRST_DIGIT + d.
pub const FIRST_DIGIT: u32 = 4;
pub const VOCAB: usize = 14;

fn data_err(e: kiln_data::DataError) -> KilnError {
    KilnError::Data(e.to_string())
}

/// `count` seeded reversal examples: example i depends on (seed, i) alone.
#[derive(Clone, Debug)]
pub struct ReversalTask {
    pub count: usize,
    pub seed: u64,
    pub min_len: usize,
    pub max_len: usize,
}

impl ReversalTask {
    /// The digits of example i.
    pub fn digits(&self, i: usize) -> Vec<u32> {
        let mut rng = Rng::new(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
        let len = self.min_len + rng.below(self.max_len - self.min_len + 1);
        (0..len).map(|_| rng.below(10) as u32).collect()
    }
}

impl Dataset for ReversalTask {
    type Sample = Sequence;
    fn len(&self) -> usize {
        self.count
    }
    fn get(&self, i: usize) -> kiln_data::Result<Sequence> {
        let x = self.digits(i);
        let l = x.len();
        let mut s = vec![SOS];
        s.extend(x.iter().map(|d| FIRST_DIGIT + d));
        s.push(SEP);
        s.extend(x.iter().rev().map(|d| FIRST_DIGIT + d));
        s.push(EOS);
        let tokens = s[..s.len() - 1].to_vec();
        // Predictions of the read half (x1 .. xL and <sep>) are not scored.
        let targets = (1..s.len()).map(|k| if k <= l + 1 { PAD } else { s[k] }).collect();
        Ok(Sequence { tokens, targets: Some(targets) })
    }
}

/// What the reversal run sets.
#[derive(Clone, Debug)]
pub struct ReversalConfig {
    pub shape: TransformerLmShape,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub warmup: u64,
    pub seed: u64,
    pub eval_count: usize,
    pub min_len: usize,
    pub max_len: usize,
}

impl Default for ReversalConfig {
    fn default() -> Self {
        ReversalConfig {
            shape: TransformerLmShape { vocab: VOCAB, d_model: 64, heads: 4, layers: 2, feedforward: 256, max_len: 42 },
            batch_size: 64,
            steps: 1500,
            lr: 1e-3,
            warmup: 100,
            seed: 42,
            eval_count: 1000,
            min_len: 2,
            max_len: 20,
        }
    }
}

/// What a reversal run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ReversalReport {
    pub adapter: String,
    pub shape: TransformerLmShape,
    pub steps: u64,
    pub eval_sequences: usize,
    /// Held-out sequences written exactly (every digit and the end).
    pub exact_match: f64,
    /// Written tokens right.
    pub token_accuracy: f64,
    /// Exact match by length, min_len first.
    pub exact_by_length: Vec<f64>,
    pub parameters: usize,
    pub seconds: f64,
    pub ms_per_step: f64,
}

/// (exact match, token accuracy, exact match by length) of `model` on `task`, teacher-forced.
pub fn evaluate(model: &TransformerLm, task: &ReversalTask) -> Result<(f64, f64, Vec<f64>)> {
    let loader = DataLoader::new(task.clone(), PadSequences { pad: PAD }, LoaderOptions { batch_size: 250, ..Default::default() }).map_err(data_err)?;
    let (mut exact, mut right, mut scored) = (0usize, 0usize, 0usize);
    let lengths = task.max_len - task.min_len + 1;
    let (mut by_len_exact, mut by_len_count) = (vec![0usize; lengths], vec![0usize; lengths]);
    for batch in loader.epoch(0) {
        let batch = batch.map_err(data_err)?;
        let t = batch.upload()?;
        let logits = no_grad(|| model.forward(&t[0]))?.to_vec()?;
        let targets = match batch.arrays.iter().find(|a| a.name == "targets").map(|a| &a.data) {
            Some(HostData::U32(v)) => v.clone(),
            _ => return Err(KilnError::Data("a reversal batch without targets".into())),
        };
        let width = t[0].shape()[1];
        for (row, &index) in batch.indices.iter().enumerate() {
            let mut all_right = true;
            for k in 0..width {
                let want = targets[row * width + k];
                if want == PAD {
                    continue;
                }
                let at = (row * width + k) * VOCAB;
                let got = kiln_nn::decode::argmax(&logits[at..at + VOCAB]) as u32;
                scored += 1;
                if got == want {
                    right += 1;
                } else {
                    all_right = false;
                }
            }
            let len = task.digits(index).len() - task.min_len;
            by_len_count[len] += 1;
            if all_right {
                exact += 1;
                by_len_exact[len] += 1;
            }
        }
    }
    let by_len = by_len_exact.iter().zip(&by_len_count).map(|(&e, &c)| e as f64 / c.max(1) as f64).collect();
    Ok((exact as f64 / task.count.max(1) as f64, right as f64 / scored.max(1) as f64, by_len))
}

/// Trains on fresh seeded examples (`steps` x `batch_size` of them, never repeated) and evaluates on
/// `eval_count` held-out ones from another seed.
pub fn train_reversal(cfg: &ReversalConfig, progress: impl FnMut(&Progress)) -> Result<(TransformerLm, ReversalReport)> {
    let started = Instant::now();
    let device = Device::current()?;
    if cfg.shape.max_len < 2 * cfg.max_len + 2 || cfg.min_len == 0 || cfg.min_len > cfg.max_len {
        return Err(KilnError::Usage(format!("lengths {}..={} need a positional table of {} (got {})", cfg.min_len, cfg.max_len, 2 * cfg.max_len + 2, cfg.shape.max_len)));
    }
    let mut vs = VarStore::new(cfg.seed);
    let model = TransformerLm::new(&mut vs, cfg.shape)?;
    vs.finish()?;
    let schedule = Schedule { kind: LrSchedule::Cosine { min_factor: 0.1 }, warmup: cfg.warmup };
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.98, eps: 1e-9 }, cfg.lr, 0.0, schedule, cfg.steps)?;
    opt.clip = Some(Clip::GlobalNorm(1.0));
    let train = ReversalTask { count: cfg.steps as usize * cfg.batch_size, seed: cfg.seed, min_len: cfg.min_len, max_len: cfg.max_len };
    let options = LoaderOptions { batch_size: cfg.batch_size, drop_last: true, ..Default::default() };
    let loader = DataLoader::new(train, PadSequences { pad: PAD }, options).map_err(data_err)?;
    let mut trainer = Trainer::new(1, cfg.steps).callback(OnProgress(progress));
    trainer.max_steps = Some(cfg.steps);
    let ignore = loss::CrossEntropyOptions { ignore_index: Some(PAD), label_smoothing: 0.0 };
    let step = |batch: &HostBatch, _: u64| {
        let t = batch.upload()?;
        let l = loss::cross_entropy_with(&model.forward(&t[0])?, &t[2].reshape(&[t[2].numel()])?, ignore)?;
        opt.step(&vs, &l.backward()?)?;
        Ok(StepValues { loss: l, correct: None })
    };
    let evaluate_epoch = |t: crate::trainer::EpochTally| Ok(EpochRecord::from_training_loss(&t, cfg.lr, started.elapsed().as_secs_f64()));
    let fit = trainer.fit(&loader, step, evaluate_epoch)?;
    let held_out = ReversalTask { count: cfg.eval_count, seed: cfg.seed ^ 0x5e_ed0f_7e57, min_len: cfg.min_len, max_len: cfg.max_len };
    let (exact_match, token_accuracy, exact_by_length) = evaluate(&model, &held_out)?;
    let report = ReversalReport {
        adapter: device.adapter_name(),
        shape: cfg.shape,
        steps: fit.steps,
        eval_sequences: cfg.eval_count,
        exact_match,
        token_accuracy,
        exact_by_length,
        parameters: vs.num_values(),
        seconds: started.elapsed().as_secs_f64(),
        ms_per_step: 1000.0 * fit.step_seconds / fit.steps.max(1) as f64,
    };
    Ok((model, report))
}
