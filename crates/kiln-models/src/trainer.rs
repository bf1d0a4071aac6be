//! The reusable training loop: epochs of batches from a [`DataLoader`], a step function the user supplies,
//! an evaluation at each epoch's end, and callbacks (progress, metrics.csv, loss.png, early stopping,
//! checkpoints). `kiln train` is built on it (train.rs); a model of any kind can be, since the step function
//! owns the forward pass, the loss, the backward pass and the optimizer(s).
//!
//! Each step's values (its loss, and the count of right answers for a classifier) are read back a step
//! behind: the host records step n + 1 while the GPU runs step n.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use kiln_data::{Collate, DataLoader, Dataset, HostBatch};
use kiln_graph::{no_grad, KilnError, PendingValues, Tensor};
use serde::Serialize;

type Result<T, E = KilnError> = std::result::Result<T, E>;

/// What one training step hands back to be read: its loss (a scalar) and, for classifiers, how many of the
/// batch it got right (a scalar).
pub struct StepValues {
    pub loss: Tensor,
    pub correct: Option<Tensor>,
}

/// One progress update (per step, and with `epoch_end` filled at each epoch end).
#[derive(Clone, Debug)]
pub struct Progress {
    pub epoch: usize,
    pub epochs: usize,
    pub step: u64,
    pub total_steps: u64,
    pub loss: f32,
    pub samples_per_s: f64,
    pub epoch_end: Option<EpochRecord>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    /// Accuracy on the training batches as they were trained (classifiers; NaN otherwise).
    pub train_accuracy: f64,
    pub dev_loss: f64,
    /// The metric that picks the best epoch, higher is better (accuracy, R^2, ...).
    pub dev_metric: f64,
    pub lr: f32,
    /// Since the run started.
    pub seconds: f64,
    /// Training samples per second over the epoch's steps (the evaluation after them not counted).
    pub samples_per_s: f64,
}

impl EpochRecord {
    /// The record of a model trained without a dev split (the language models): the epoch's mean training loss
    /// stands for the dev loss, its negative for the metric.
    pub fn from_training_loss(t: &EpochTally, lr: f32, seconds_since_start: f64) -> EpochRecord {
        let mean = t.loss_sum / t.samples.max(1) as f64;
        EpochRecord {
            epoch: t.epoch,
            train_loss: mean,
            train_accuracy: f64::NAN,
            dev_loss: mean,
            dev_metric: -mean,
            lr,
            seconds: seconds_since_start,
            samples_per_s: t.samples as f64 / t.seconds.max(1e-9),
        }
    }
}

/// A training epoch's sums, for the evaluation at its end: mean loss and accuracy over the samples seen.
#[derive(Clone, Copy, Debug)]
pub struct EpochTally {
    pub epoch: usize,
    pub samples: usize,
    pub loss_sum: f64,
    pub correct_sum: f64,
    pub seconds: f64,
}

/// The state callbacks see at an epoch's end.
pub struct EpochEnd<'a> {
    pub record: &'a EpochRecord,
    /// Every epoch's record so far, this one last.
    pub history: &'a [EpochRecord],
    /// The epoch-end progress report (`epoch_end` filled).
    pub progress: Progress,
    pub best_metric: f64,
    pub best_epoch: usize,
    pub improved: bool,
    /// The last epoch of the run: the planned last one, or one a callback stopped at.
    pub last: bool,
}

/// Where a run stands in the middle of an epoch, with everything a resumed run needs to continue from it
/// exactly: the batches done in this epoch's order and their sums. Every step before it is complete.
#[derive(Clone, Copy, Debug)]
pub struct Position {
    pub epoch: usize,
    pub batches_done: usize,
    pub batches: usize,
    /// The epoch's sums over `batches_done` batches.
    pub tally: EpochTally,
    /// Steps taken by the whole run, the interrupted part included.
    pub steps: u64,
    /// Set when the user interrupted the run (Ctrl-C): the loop stops after the callbacks saw it.
    pub interrupted: bool,
}

/// Hooks into the loop. `stop` is asked of every callback first; then `on_epoch_end` runs with `last` set
/// if any said yes. In the middle of an epoch, when a callback says `save_due` (or the run is interrupted),
/// the loop waits for the steps in flight and hands every callback the `Position`.
pub trait Callback {
    fn on_step(&mut self, _progress: &Progress) -> Result<()> {
        Ok(())
    }
    /// Asked after each step: does this callback want a mid-epoch `Position` now?
    fn save_due(&mut self) -> bool {
        false
    }
    fn on_position(&mut self, _position: &Position) -> Result<()> {
        Ok(())
    }
    fn stop(&mut self, _end: &EpochEnd) -> bool {
        false
    }
    fn on_epoch_end(&mut self, _end: &EpochEnd) -> Result<()> {
        Ok(())
    }
}

/// Any `FnMut(&Progress)` reports progress: each step, and each epoch end with its record.
pub struct OnProgress<F: FnMut(&Progress)>(pub F);

impl<F: FnMut(&Progress)> Callback for OnProgress<F> {
    fn on_step(&mut self, p: &Progress) -> Result<()> {
        (self.0)(p);
        Ok(())
    }
    fn on_epoch_end(&mut self, end: &EpochEnd) -> Result<()> {
        (self.0)(&end.progress);
        Ok(())
    }
}

/// Stops when the dev metric has not improved for `patience` epochs.
pub struct EarlyStopping {
    pub patience: usize,
}

impl Callback for EarlyStopping {
    fn stop(&mut self, end: &EpochEnd) -> bool {
        end.record.epoch >= end.best_epoch + self.patience
    }
}

/// Appends one line per epoch to a CSV file (created with its header, or appended to when resuming).
pub struct MetricsCsv {
    file: std::fs::File,
    path: PathBuf,
    with_accuracy: bool,
}

impl MetricsCsv {
    /// `dev_metric_name` heads the metric column ("dev_accuracy", "dev_r2"); `with_accuracy` adds the training
    /// accuracy column. `resume_at` (a resumed run's first epoch) keeps the file's lines of earlier epochs and
    /// drops any of that epoch or later (written after the checkpoint the run resumes from).
    pub fn open(path: PathBuf, with_accuracy: bool, dev_metric_name: &str, resume_at: Option<usize>) -> Result<MetricsCsv> {
        let err = |e: std::io::Error| KilnError::Io { path: path.display().to_string(), message: format!("cannot write: {e}") };
        let append = match (resume_at, std::fs::read_to_string(&path)) {
            (Some(epoch), Ok(text)) => {
                let before = |l: &&str| l.split(',').next().and_then(|e| e.parse::<usize>().ok()).is_none_or(|e| e < epoch);
                let kept: String = text.lines().filter(before).map(|l| format!("{l}\n")).collect();
                std::fs::write(&path, kept).map_err(err)?;
                true
            }
            _ => false,
        };
        let mut file = std::fs::OpenOptions::new().create(true).append(append).write(true).truncate(!append).open(&path).map_err(err)?;
        if !append {
            let acc = if with_accuracy { "train_accuracy," } else { "" };
            writeln!(file, "epoch,train_loss,{acc}dev_loss,{dev_metric_name},lr,seconds,samples_per_s").map_err(err)?;
        }
        Ok(MetricsCsv { file, path, with_accuracy })
    }
}

impl Callback for MetricsCsv {
    fn on_epoch_end(&mut self, end: &EpochEnd) -> Result<()> {
        let r = end.record;
        let acc = if self.with_accuracy { format!("{:.6},", r.train_accuracy) } else { String::new() };
        writeln!(self.file, "{},{:.6},{acc}{:.6},{:.6},{:.6e},{:.3},{:.1}", r.epoch, r.train_loss, r.dev_loss, r.dev_metric, r.lr, r.seconds, r.samples_per_s)
            .map_err(|e| KilnError::Io { path: self.path.display().to_string(), message: format!("cannot write: {e}") })
    }
}

/// A step's values on their way back: the readback, the batch size, whether a count of right answers
/// follows the loss, the step number.
type InFlight = (PendingValues, usize, bool, u64);

/// What a run of the loop measured.
#[derive(Clone, Debug, Default)]
pub struct FitReport {
    pub steps: u64,
    pub samples_seen: usize,
    /// Time inside training steps only (upload to the step's submit): evaluation and callbacks are not steps.
    pub step_seconds: f64,
    /// From the loop's `started` instant to the end of the first step.
    pub first_step_seconds: Option<f64>,
    /// Submits and buffers created per step after the first step of each batch size (a short last batch is
    /// a new shape), and how many such steps.
    pub steady_submits: u64,
    pub steady_buffers: u64,
    pub steady_steps: u64,
    pub history: Vec<EpochRecord>,
    pub best_metric: f64,
    pub best_epoch: usize,
    pub stopped_early: bool,
}

/// The loop. `epochs` and `total_steps` are for progress reports; `start_epoch` > 1 resumes.
pub struct Trainer<'a> {
    pub start_epoch: usize,
    /// The number of the run's first step: 0, or for a resumed run the steps already taken, so step numbers
    /// (and whatever is seeded by them, such as augmentation) continue where the interrupted run stopped.
    pub first_step: u64,
    pub epochs: usize,
    pub total_steps: u64,
    /// The best dev metric so far and its epoch (a resumed run carries them over).
    pub best: (f64, usize),
    pub started: Instant,
    /// A run resumed in the middle of `start_epoch`: the batches of it already done and their sums.
    pub resume_position: Option<(usize, EpochTally)>,
    /// Stop after this many steps of this run (the epoch it falls in ends there, and is evaluated).
    pub max_steps: Option<u64>,
    /// Set from outside (a Ctrl-C handler) to stop after the current step, once the callbacks have seen the
    /// position.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    callbacks: Vec<Box<dyn Callback + 'a>>,
    seen_batch_sizes: std::collections::HashSet<usize>,
}

impl<'a> Trainer<'a> {
    pub fn new(epochs: usize, total_steps: u64) -> Trainer<'a> {
        Trainer {
            start_epoch: 1,
            first_step: 0,
            epochs,
            total_steps,
            best: (f64::NEG_INFINITY, 0),
            started: Instant::now(),
            resume_position: None,
            max_steps: None,
            interrupt: None,
            callbacks: Vec::new(),
            seen_batch_sizes: Default::default(),
        }
    }

    pub fn callback(mut self, c: impl Callback + 'a) -> Trainer<'a> {
        self.callbacks.push(Box::new(c));
        self
    }

    /// Runs the epochs. `step(batch, step_number)` (counted from `first_step`) records one training step (forward, loss, backward,
    /// optimizer updates) and returns the values to read back; `evaluate(tally)` runs at each epoch's end
    /// and makes its record (dev loss and metric, learning rate).
    pub fn fit<D: Dataset, C: Collate<D::Sample>>(
        &mut self,
        loader: &DataLoader<D, C>,
        mut step: impl FnMut(&HostBatch, u64) -> Result<StepValues>,
        mut evaluate: impl FnMut(EpochTally) -> Result<EpochRecord>,
    ) -> Result<FitReport> {
        let mut report = FitReport { best_metric: self.best.0, best_epoch: self.best.1, ..Default::default() };
        self.seen_batch_sizes.clear();
        for epoch in self.start_epoch..=self.epochs {
            let epoch_started = Instant::now();
            let (skip, mut tally) = match self.resume_position.take() {
                Some((done, t)) if epoch == self.start_epoch => (done, EpochTally { epoch, seconds: 0.0, ..t }),
                _ => (0, EpochTally { epoch, samples: 0, loss_sum: 0.0, correct_sum: 0.0, seconds: 0.0 }),
            };
            let mut pending: Option<InFlight> = None;
            for (i, batch) in loader.epoch_from(epoch as u64, skip).enumerate() {
                if self.max_steps.is_some_and(|m| report.steps >= m) {
                    break;
                }
                let batch = batch.map_err(|e| KilnError::Data(e.to_string()))?;
                self.run_step(&batch, &mut step, &mut pending, &mut tally, &mut report)?;
                let interrupted = self.interrupt.as_ref().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
                if interrupted || self.callbacks.iter_mut().any(|c| c.save_due()) {
                    if let Some(p) = pending.take() {
                        self.tally(p, &mut tally, &report)?;
                    }
                    let position = Position { epoch, batches_done: skip + i + 1, batches: loader.len(), tally, steps: self.first_step + report.steps, interrupted };
                    self.callbacks.iter_mut().try_for_each(|c| c.on_position(&position))?;
                    if interrupted {
                        let (done, of) = (position.batches_done, position.batches);
                        return Err(KilnError::Interrupted(format!("interrupted in epoch {epoch} after batch {done} of {of} (step {})", position.steps)));
                    }
                }
            }
            if let Some(last) = pending.take() {
                self.tally(last, &mut tally, &report)?;
            }
            tally.seconds = epoch_started.elapsed().as_secs_f64();
            let record = evaluate(tally)?;
            let out_of_steps = self.max_steps.is_some_and(|m| report.steps >= m);
            if self.end_epoch(record, &mut report, out_of_steps)? || out_of_steps {
                break;
            }
        }
        Ok(report)
    }

    /// Records one step and submits it with its values' readback; the previous step's values are taken
    /// first, so the host records step n + 1 while the GPU runs step n.
    fn run_step(
        &mut self,
        batch: &HostBatch,
        step: &mut impl FnMut(&HostBatch, u64) -> Result<StepValues>,
        pending: &mut Option<InFlight>,
        tally: &mut EpochTally,
        report: &mut FitReport,
    ) -> Result<()> {
        let n = batch.len();
        let before = kiln_graph::backend::thread_stats();
        let step_started = Instant::now();
        // Anomaly detection (kiln_graph::anomaly): a watch per step, read at its end (a sync: a debug mode).
        let watch = kiln_graph::backend::Device::current().ok().filter(|d| kiln_graph::anomaly::enabled(d));
        if let Some(dev) = &watch {
            kiln_graph::anomaly::begin(dev)?;
        }
        let values = step(batch, self.first_step + report.steps);
        // The watch is closed whatever the step returned, so a failed step leaves none open on the thread.
        let first_bad = if watch.is_some() { kiln_graph::anomaly::end() } else { Ok(None) };
        let values = values?;
        if let Some(op) = first_bad? {
            return Err(KilnError::Training(format!("step {}: the first NaN or infinity came from {op} (anomaly detection)", self.first_step + report.steps + 1)));
        }
        if values.loss.numel() != 1 || values.correct.as_ref().is_some_and(|c| c.numel() != 1) {
            return Err(KilnError::Usage(format!("a training step returns scalars: its loss is {:?}", values.loss.shape())));
        }
        let read = match &values.correct {
            Some(c) => no_grad(|| Tensor::concat(&[&values.loss.reshape(&[1])?, &c.reshape(&[1])?], 0))?,
            None => values.loss.clone(),
        };
        // This step is recorded, not yet submitted: take the last step's values (its readback buffer returns
        // to the pool and serves this one), then submit this step with its own readback.
        if let Some(previous) = pending.take() {
            self.tally(previous, tally, report)?;
        }
        *pending = Some((read.read_start()?, n, values.correct.is_some(), self.first_step + report.steps + 1));
        report.step_seconds += step_started.elapsed().as_secs_f64();
        report.first_step_seconds.get_or_insert_with(|| self.started.elapsed().as_secs_f64());
        let after = kiln_graph::backend::thread_stats();
        if !self.seen_batch_sizes.insert(n) {
            report.steady_submits += after.submits - before.submits;
            report.steady_buffers += after.buffers_created - before.buffers_created;
            report.steady_steps += 1;
        }
        report.steps += 1;
        report.samples_seen += n;
        Ok(())
    }

    /// Waits for one step's values, adds them to the epoch's sums and reports progress.
    fn tally(&mut self, (read, n, with_correct, at_step): InFlight, tally: &mut EpochTally, report: &FitReport) -> Result<()> {
        let values = read.wait()?;
        let loss = values[0];
        if !loss.is_finite() {
            return Err(KilnError::Training(format!(
                "loss became {loss} at step {at_step} (epoch {}); try a smaller --lr (a label or index out of range makes NaN too); --anomaly (KILN_ANOMALY=1) names the op that made it first",
                tally.epoch
            )));
        }
        if with_correct {
            tally.correct_sum += values[1] as f64;
        }
        tally.loss_sum += loss as f64 * n as f64;
        tally.samples += n;
        let samples_per_s = (report.samples_seen as f64) / report.step_seconds.max(1e-9);
        let p = Progress { epoch: tally.epoch, epochs: self.epochs, step: at_step, total_steps: self.total_steps, loss, samples_per_s, epoch_end: None };
        self.callbacks.iter_mut().try_for_each(|c| c.on_step(&p))
    }

    /// Records the epoch, asks the callbacks whether to stop, then runs their epoch-end hooks. True: stop.
    fn end_epoch(&mut self, record: EpochRecord, report: &mut FitReport, out_of_steps: bool) -> Result<bool> {
        let improved = record.dev_metric > report.best_metric;
        if improved {
            (report.best_metric, report.best_epoch) = (record.dev_metric, record.epoch);
        }
        let progress = Progress {
            epoch: record.epoch,
            epochs: self.epochs,
            step: self.first_step + report.steps,
            total_steps: self.total_steps,
            loss: record.train_loss as f32,
            samples_per_s: record.samples_per_s,
            epoch_end: Some(record.clone()),
        };
        let last = record.epoch == self.epochs || out_of_steps;
        report.history.push(record);
        let history = &report.history[..];
        let record = history.last().expect("just pushed");
        let mut end = EpochEnd { record, history, progress, best_metric: report.best_metric, best_epoch: report.best_epoch, improved, last };
        let stop = self.callbacks.iter_mut().fold(false, |stop, c| c.stop(&end) | stop);
        end.last |= stop;
        for c in &mut self.callbacks {
            c.on_epoch_end(&end)?;
        }
        report.stopped_early = stop;
        Ok(stop)
    }
}

/// Adam (0.9, 0.999, 1e-8) at `lr`, no weight decay, a warm-up of min(100, steps / 4) steps then a cosine
/// decay to 5% of `lr` at `steps`, gradients clipped to a global norm of `clip` when given: what g2p, the
/// scene models, YOLO and the segmentation nets train with.
pub fn adam_cosine(vs: &kiln_nn::VarStore, lr: f32, steps: u64, clip: Option<f32>) -> Result<kiln_nn::Optimizer> {
    let schedule = kiln_nn::schedule::Schedule { kind: kiln_nn::schedule::LrSchedule::Cosine { min_factor: 0.05 }, warmup: 100.min(steps / 4) };
    let mut opt = kiln_nn::Optimizer::new(vs, kiln_nn::OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, lr, 0.0, schedule, steps)?;
    opt.clip = clip.map(kiln_nn::Clip::GlobalNorm);
    Ok(opt)
}

/// Trains `steps` steps over `loader` (as many epochs as that takes): each step `loss_of(batch)` backward and
/// through `opt`, each epoch's record its mean training loss (the models without a dev split: g2p, names, the
/// scene models). `started` is when the run began, for the records' times.
#[allow(clippy::too_many_arguments)]
pub fn fit_steps<D: Dataset, C: Collate<D::Sample>>(
    loader: &DataLoader<D, C>,
    steps: u64,
    lr: f32,
    started: Instant,
    progress: impl FnMut(&Progress),
    opt: &mut kiln_nn::Optimizer,
    vs: &kiln_nn::VarStore,
    mut loss_of: impl FnMut(&HostBatch) -> Result<Tensor>,
) -> Result<FitReport> {
    let mut trainer = Trainer::new((steps as usize).div_ceil(loader.len().max(1)), steps).callback(OnProgress(progress));
    trainer.max_steps = Some(steps);
    let step = |batch: &HostBatch, _: u64| {
        let l = loss_of(batch)?;
        opt.step(vs, &l.backward()?)?;
        Ok(StepValues { loss: l, correct: None })
    };
    trainer.fit(loader, step, |t| Ok(EpochRecord::from_training_loss(&t, lr, started.elapsed().as_secs_f64())))
}

/// The first and last losses of a model's own step loop, read each step (which also ends the step's
/// recording) and passed to its progress callback: what YOLO, segmentation, the siamese net, the VAE and the
/// autoencoders report.
#[derive(Clone, Copy, Debug)]
pub struct LossTrace {
    pub first: f64,
    pub last: f64,
}

impl Default for LossTrace {
    fn default() -> Self {
        LossTrace { first: f64::NAN, last: f64::NAN }
    }
}

/// Where a scene model's run writes its picture after `steps_done` steps, when pictures are due every `every`
/// steps (0: never) and the run has a directory (created here): `scenes-step-000300.png`, so a run's
/// pictures sort by step.
pub fn sample_picture_path(out_dir: Option<&std::path::Path>, every: u64, steps_done: u64) -> Result<Option<std::path::PathBuf>> {
    match out_dir {
        Some(dir) if every > 0 && steps_done.is_multiple_of(every) => {
            std::fs::create_dir_all(dir).map_err(|e| KilnError::Io { path: dir.display().to_string(), message: e.to_string() })?;
            Ok(Some(dir.join(format!("scenes-step-{steps_done:06}.png"))))
        }
        _ => Ok(None),
    }
}

impl LossTrace {
    /// Reads step `step`'s (0-based) loss, keeps it, and calls `progress(step + 1, loss)`.
    pub fn record(&mut self, step: u64, loss: &kiln_graph::Tensor, progress: &mut impl FnMut(u64, f32)) -> Result<f64> {
        let v = loss.to_scalar()? as f64;
        if step == 0 {
            self.first = v;
        }
        self.last = v;
        progress(step + 1, v as f32);
        Ok(v)
    }
}
