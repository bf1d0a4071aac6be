//! The training loop shared by `kiln train`, the examples and the tests: load and prepare the data, build the
//! model, run mini-batch epochs (one submit per step: the loss readback), evaluate, report.

use std::path::PathBuf;
use std::time::Instant;

use kiln_data::{ArrayDataset, Collate, DataLoader, HostBatch, LoaderOptions, Split, StackRows, Standardizer, Targets};
use kiln_graph::backend::Device;
use kiln_graph::{no_grad, KilnError, Tensor};
use kiln_nn::checkpoint;
use kiln_nn::metrics;
use kiln_nn::schedule::Schedule;
use kiln_nn::{Module, Optimizer, OptimizerKind, VarStore};
use serde::Serialize;

use crate::linear_models::{self, normal_equation, Model, Task};
use crate::registry::{self, Input, ModelEntry};
use crate::trainer::{Callback, EarlyStopping, EpochEnd, EpochRecord, EpochTally, FitReport, MetricsCsv, OnProgress, Position, Progress, StepValues, Trainer};

/// Everything `kiln train` can set; `None` takes the model's default.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub model: String,
    pub dataset: String,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f32>,
    pub optimizer: Option<OptimizerKind>,
    pub weight_decay: Option<f32>,
    pub schedule: Option<Schedule>,
    pub seed: u64,
    pub hidden: Option<Vec<usize>>,
    /// polyreg: polynomial degree.
    pub degree: Option<usize>,
    /// polyreg: which feature column (default: the data set's most informative one, BMI for diabetes).
    pub feature: Option<usize>,
    /// Train on at most this many samples (reduced budgets, over-fitting demonstrations).
    pub train_limit: Option<usize>,
    /// Where metrics.csv goes; None writes nothing.
    pub out_dir: Option<PathBuf>,
    /// Read data files from here instead of the bundled copies.
    pub data_dir: Option<PathBuf>,
    /// Start from the parameters of this checkpoint (every name and shape that matches).
    pub from: Option<PathBuf>,
    /// Parameter-name prefixes to freeze (e.g. "features").
    pub freeze: Vec<String>,
    /// Continue from `out_dir`'s last.safetensors (parameters, optimizer state, epoch).
    pub resume: bool,
    /// Stop when the dev metric has not improved for this many epochs.
    pub patience: Option<usize>,
    /// Seeded GPU augmentation of each training batch (convolutional models).
    pub augment: Option<kiln_graph::Augment>,
    /// Depth of `resnet` (CIFAR-style 6n+2: 20, 32, 56).
    pub depth: Option<usize>,
    /// Seconds between checkpoints in the middle of an epoch (with `out_dir`; default 300): a crash loses at
    /// most this much training, and `--resume` continues from the batch it reached.
    pub checkpoint_every_s: Option<f64>,
    /// Set from outside (a Ctrl-C handler) to stop after the current step; the run saves where it is first
    /// (with `out_dir`) and returns `KilnError::Interrupted`.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Train data-parallel over these devices (`kiln train --devices`; `kiln_nn::parallel::open_devices`
    /// opens them from such a list): a replica of the model on each, every batch (`batch_size` is the whole
    /// batch) split between them, the gradients averaged before each update. The first device is the main
    /// one: it evaluates and writes the checkpoints. Empty: the thread's current device; one: that device.
    pub devices: Vec<Device>,
    /// One rank of a distributed run (`kiln train --distributed mpi` under `mpirun`): every rank runs this
    /// same configuration, takes its own rows of each batch (`batch_size` is the whole batch of all ranks),
    /// and the gradients are summed across the ranks too. Rank 0 alone writes metrics and checkpoints.
    pub distributed: Option<kiln_nn::parallel::Distributed>,
    /// Synchronised batch norm in data-parallel training (`kiln train --sync-bn`, PyTorch's `SyncBatchNorm`):
    /// every batch-norm layer normalises each shard with the whole batch's statistics (all devices, all ranks),
    /// so the run trains as one device with the whole batch does. The replicas' forward passes then run in
    /// lock step, one thread per device. Off: each device uses its own shard's statistics (PyTorch DDP's default).
    pub sync_batch_norm: bool,
}

impl TrainConfig {
    pub fn new(model: &str, dataset: &str) -> TrainConfig {
        TrainConfig {
            model: model.into(),
            dataset: dataset.into(),
            epochs: None,
            batch_size: None,
            lr: None,
            optimizer: None,
            weight_decay: None,
            schedule: None,
            seed: 42,
            hidden: None,
            degree: None,
            feature: None,
            train_limit: None,
            out_dir: None,
            data_dir: None,
            from: None,
            freeze: Vec::new(),
            resume: false,
            patience: None,
            augment: None,
            depth: None,
            checkpoint_every_s: None,
            interrupt: None,
            devices: Vec::new(),
            distributed: None,
            sync_batch_norm: false,
        }
    }
}

/// The settings a run actually used (defaults filled in).
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub optimizer: String,
    pub weight_decay: f32,
    pub schedule: String,
    pub hidden: Vec<usize>,
    pub degree: usize,
    pub seed: u64,
    pub augment: String,
}

/// The run's settings: the command line's where given, else the model's defaults for this data set.
fn settings(cfg: &TrainConfig, entry: &ModelEntry, train_len: usize) -> Result<(Settings, OptimizerKind, Schedule), KilnError> {
    let d = (entry.defaults)(&cfg.dataset);
    let s = Settings {
        epochs: cfg.epochs.unwrap_or(d.epochs),
        batch_size: cfg.batch_size.or(d.batch_size).unwrap_or(train_len).min(train_len.max(1)),
        lr: cfg.lr.unwrap_or(d.lr),
        optimizer: String::new(),
        weight_decay: cfg.weight_decay.unwrap_or(d.weight_decay),
        schedule: String::new(),
        hidden: cfg.hidden.clone().unwrap_or_else(|| vec![128]),
        degree: cfg.degree.unwrap_or(1),
        seed: cfg.seed,
        augment: String::new(),
    };
    if s.epochs == 0 || s.batch_size == 0 || !(s.lr > 0.0 && s.lr.is_finite()) || s.weight_decay < 0.0 || s.hidden.contains(&0) || s.degree == 0 {
        return Err(KilnError::Config(format!(
            "invalid settings: epochs {} and batch size {} must be >= 1, lr {} must be > 0, weight decay {} >= 0, hidden sizes {:?} >= 1, degree {} >= 1",
            s.epochs, s.batch_size, s.lr, s.weight_decay, s.hidden, s.degree
        )));
    }
    let opt = cfg.optimizer.unwrap_or(d.optimizer);
    let sched = cfg.schedule.unwrap_or(d.schedule);
    Ok((Settings { optimizer: format!("{opt:?}"), schedule: format!("{sched:?}"), ..s }, opt, sched))
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

/// What a run produced. Serialised as the `--json` line.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub model: String,
    pub dataset: String,
    pub adapter: String,
    pub backend: String,
    pub epochs: usize,
    pub steps: u64,
    pub train_samples: usize,
    pub test_samples: usize,
    pub train_loss: f64,
    pub dev_loss: f64,
    pub test_loss: f64,
    #[serde(flatten)]
    pub test: TestMetrics,
    /// linreg: the normal equation's training cost J and GD's, on the same split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal_equation_cost: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_cost: Option<f64>,
    pub seconds: f64,
    pub samples_per_s: f64,
    pub ms_per_step: f64,
    /// From the start of the run (adapter, data, pipeline builds and any autotuning included) to the end of
    /// the first training step.
    pub seconds_to_first_step: f64,
    /// Submits per training step after the first step of each batch size; absent when no such step ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submits_per_step: Option<f64>,
    /// GPU buffers created by training steps after the first step of each batch size (0: the pool serves all).
    pub buffers_created_after_first_step: u64,
    pub peak_gpu_bytes: u64,
    pub parameters: usize,
    pub settings: Settings,
    pub history: Vec<EpochRecord>,
    /// Best dev metric over the run and the epoch it came from (what best.safetensors holds).
    pub best_dev_metric: f64,
    pub best_epoch: usize,
    pub stopped_early: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loaded_from_checkpoint: Vec<String>,
    /// A data-parallel run's devices and what averaging the gradients cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<DataParallelReport>,
}

/// What a data-parallel run (`--devices`) measured.
#[derive(Clone, Debug, Serialize)]
pub struct DataParallelReport {
    /// Each replica's device in this process, in order (the first is the main one).
    pub devices: Vec<String>,
    /// Processes (MPI ranks) of the run; 1 without `--distributed`.
    pub ranks: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub communicator: Option<String>,
    /// Bytes of gradients averaged per step (one replica's).
    pub gradient_bytes: u64,
    /// The all-reduce's mean wall time per step (host-staged: copies back, reduction, writes), counting the
    /// sums that ran during the backward as well as those after it.
    pub all_reduce_ms_per_step: f64,
    /// The all-reduce's share of the mean step time.
    pub communication_share: f64,
    /// Of the gradient buckets' copies to the host, the share that started while their replica's backward was
    /// still running (`kiln_nn::parallel::OverlappedAllReduce`): the last layers' buckets, all but the first
    /// layers' one.
    pub copies_started_in_backward: f64,
    /// The replicas' parameter checksum, equal on every replica at every epoch end (a difference stops the
    /// run with an error).
    pub checksum: String,
}

/// Seconds between checkpoint writes at epoch ends (the last epoch is always written).
const CHECKPOINT_EVERY_S: f64 = 5.0;

/// Default seconds between checkpoints in the middle of an epoch.
const MID_EPOCH_CHECKPOINT_S: f64 = 300.0;

fn ck_err(e: checkpoint::CheckpointError) -> KilnError {
    KilnError::Checkpoint(e.to_string())
}

/// What a checkpoint records about its run, so `kiln eval` and `--resume` can rebuild the model.
fn run_metadata(cfg: &TrainConfig, s: &Settings, split: &Split, scaling: &Scaling, epoch: usize, best: f64, best_epoch: usize) -> std::collections::BTreeMap<String, String> {
    let mut m: std::collections::BTreeMap<String, String> = scaling.metadata().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let hidden: Vec<String> = s.hidden.iter().map(|h| h.to_string()).collect();
    for (k, v) in [
        ("kiln.model", cfg.model.clone()),
        ("kiln.dataset", cfg.dataset.clone()),
        ("kiln.epoch", epoch.to_string()),
        ("kiln.hidden", hidden.join(",")),
        ("kiln.depth", cfg.depth.map(|v| v.to_string()).unwrap_or_default()),
        ("kiln.seed", cfg.seed.to_string()),
        ("kiln.batch_size", s.batch_size.to_string()),
        ("kiln.train_samples", split.train.len().to_string()),
        // What `prepare` needs to rebuild the same inputs and scaling for `kiln eval`.
        ("kiln.train_limit", cfg.train_limit.map(|v| v.to_string()).unwrap_or_default()),
        ("kiln.degree", cfg.degree.map(|v| v.to_string()).unwrap_or_default()),
        ("kiln.feature", cfg.feature.map(|v| v.to_string()).unwrap_or_default()),
        ("kiln.features", split.train.features.to_string()),
        ("kiln.classes", split.train.num_classes().map(|c| c.to_string()).unwrap_or_default()),
        ("kiln.best_dev_metric", best.to_string()),
        ("kiln.best_epoch", best_epoch.to_string()),
        ("kiln.version", env!("CARGO_PKG_VERSION").to_string()),
    ] {
        m.insert(k.to_string(), v);
    }
    m
}

/// The result of `kiln eval`.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: String,
    pub model: String,
    pub dataset: String,
    pub adapter: String,
    pub test_samples: usize,
    pub test_loss: f64,
    #[serde(flatten)]
    pub test: TestMetrics,
    /// Every test sample's outputs, for `Predictions::write_csv` (`kiln eval --predictions`).
    #[serde(skip)]
    pub predictions: Predictions,
}

/// Per-sample outputs of an evaluation: what a PyTorch user needs to compare a model with theirs.
#[derive(Clone, Debug, Default)]
pub struct Predictions {
    /// Outputs per sample (logits for classifiers, the prediction for regression, in the targets' units).
    pub width: usize,
    pub outputs: Vec<f32>,
    /// Classifiers: probabilities per output (softmax, or the sigmoid of each logit for binary and one-vs-all).
    pub probabilities: Vec<f32>,
    /// Classifiers: predicted and true classes.
    pub predicted: Vec<u32>,
    pub labels: Vec<u32>,
    /// Regression: the true values.
    pub targets: Vec<f32>,
}

impl Predictions {
    fn of(model: &Model, outputs: Vec<f32>, targets: &Targets) -> Predictions {
        let width = model.outputs;
        let mut p = Predictions { width, ..Default::default() };
        match targets {
            Targets::Classes { labels, .. } => {
                p.predicted = model.task.predict(&outputs, width);
                p.labels = labels.clone();
                p.probabilities = match model.task {
                    Task::Softmax => outputs
                        .chunks(width.max(1))
                        .flat_map(|row| {
                            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
                            row.iter().map(move |&v| (((v - max) as f64).exp() / sum) as f32)
                        })
                        .collect(),
                    _ => outputs.iter().map(|&z| (1.0 / (1.0 + (-(z as f64)).exp())) as f32).collect(),
                };
            }
            Targets::Values(v) => p.targets = v.clone(),
        }
        p.outputs = outputs;
        p
    }

    /// One row per test sample: `sample,label,predicted,logit_0..,prob_0..` for classifiers,
    /// `sample,target,prediction` for regression.
    pub fn write_csv(&self, path: &std::path::Path) -> Result<(), KilnError> {
        use std::fmt::Write as _;
        let mut text = String::new();
        let w = self.width.max(1);
        if self.labels.is_empty() {
            text.push_str("sample,target,prediction\n");
            for (i, (t, o)) in self.targets.iter().zip(&self.outputs).enumerate() {
                let _ = writeln!(text, "{i},{t},{o}");
            }
        } else {
            let logits: Vec<String> = (0..w).map(|j| format!("logit_{j}")).collect();
            let probs: Vec<String> = (0..w).map(|j| format!("prob_{j}")).collect();
            let _ = writeln!(text, "sample,label,predicted,{},{}", logits.join(","), probs.join(","));
            for (i, (label, predicted)) in self.labels.iter().zip(&self.predicted).enumerate() {
                let row = |v: &[f32]| v[i * w..(i + 1) * w].iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
                let _ = writeln!(text, "{i},{label},{predicted},{},{}", row(&self.outputs), row(&self.probabilities));
            }
        }
        std::fs::write(path, text).map_err(|e| KilnError::Io { path: path.display().to_string(), message: format!("cannot write the predictions: {e}") })
    }
}

/// Test-split metrics: accuracy, macro F1, confusion matrix and per-class scores for classifiers; MSE and R^2
/// for regression.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TestMetrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_macro_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_mse: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_r2: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_class: Vec<ClassReport>,
}

impl TestMetrics {
    fn of(model: &Model, outputs: &[f32], targets: &Targets) -> TestMetrics {
        let mut m = TestMetrics::default();
        match targets {
            Targets::Classes { labels, names } => {
                let pred = model.task.predict(outputs, model.outputs);
                let cm = metrics::confusion_matrix(&pred, labels, names.len());
                let scores = metrics::per_class_scores(&cm);
                m.test_accuracy = Some(metrics::accuracy(&pred, labels));
                m.test_macro_f1 = Some(metrics::macro_average(&scores).f1);
                m.per_class = scores.iter().zip(names).map(|(s, n)| ClassReport { class: n.clone(), precision: s.precision, recall: s.recall, f1: s.f1, support: s.support }).collect();
                m.confusion = cm;
            }
            Targets::Values(v) => {
                m.test_mse = Some(metrics::mse(outputs, v));
                m.test_r2 = Some(metrics::r2(outputs, v));
            }
        }
        m
    }
}

/// Evaluates a checkpoint written by `run` on a data set's test split (the split of the checkpoint's seed).
pub fn evaluate_checkpoint(path: &std::path::Path, dataset: Option<&str>, data_dir: Option<PathBuf>) -> Result<EvalReport, KilnError> {
    let ck = checkpoint::load(path).map_err(ck_err)?;
    let model_name = ck.metadata.get("kiln.model").ok_or_else(|| KilnError::Checkpoint(format!("{}: not a Kiln training checkpoint (no kiln.model in the metadata)", path.display())))?;
    evaluate_checkpoint_with(registry::entry(model_name)?, path, dataset, data_dir)
}

/// [`evaluate_checkpoint`] of a run of a model entry of one's own ([`run_with`]).
pub fn evaluate_checkpoint_with(entry: &ModelEntry, path: &std::path::Path, dataset: Option<&str>, data_dir: Option<PathBuf>) -> Result<EvalReport, KilnError> {
    // The thread's current device: the default one, or the device of an enclosing `Device::scope`.
    let g = Device::current()?;
    let ck = checkpoint::load(path).map_err(ck_err)?;
    let meta = |k: &str| ck.metadata.get(k).cloned();
    let model_name = meta("kiln.model").ok_or_else(|| KilnError::Checkpoint(format!("{}: not a Kiln training checkpoint (no kiln.model in the metadata)", path.display())))?;
    if model_name != entry.name {
        return Err(KilnError::Checkpoint(format!("{} holds a {model_name:?}, not a {}", path.display(), entry.name)));
    }
    let dataset = dataset.map(str::to_string).or_else(|| meta("kiln.dataset")).unwrap_or_default();
    let seed = meta("kiln.seed").and_then(|v| v.parse().ok()).unwrap_or(42);
    let hidden: Vec<usize> = meta("kiln.hidden").unwrap_or_default().split(',').filter_map(|h| h.parse().ok()).collect();
    let num = |k: &str| meta(k).and_then(|v| v.parse::<usize>().ok());
    let cfg = TrainConfig { seed, data_dir, train_limit: num("kiln.train_limit"), degree: num("kiln.degree"), feature: num("kiln.feature"), ..TrainConfig::new(&model_name, &dataset) };
    let (split, _) = prepare(&cfg, entry, cfg.degree.unwrap_or(1))?;
    let mut vs = VarStore::new(seed);
    let arch = linear_models::Arch { hidden: &hidden, depth: num("kiln.depth").unwrap_or(20), seed };
    let mut model = (entry.build)(&mut vs, &split.test, &arch)?;
    vs.finish()?;
    vs.load_checkpoint(&path.display().to_string(), &ck, true, |_| true).map_err(ck_err)?;
    model.set_training(false);
    // Regression models were trained on standardised targets (see TargetScale): evaluate the same way.
    let ts = TargetScale::fit(&split.train);
    let scaled = match ts {
        Some(t) => split.map(|d| t.apply(d)),
        None => split.clone(),
    };
    let (test_loss, out) = evaluate(&model, &scaled.test, ts)?;
    let test = TestMetrics::of(&model, &out, &split.test.targets);
    let predictions = Predictions::of(&model, out, &split.test.targets);
    Ok(EvalReport { checkpoint: path.display().to_string(), model: model_name, dataset, adapter: g.adapter_name(), test_samples: split.test.len(), test_loss, test, predictions })
}

fn data_err(e: kiln_data::DataError) -> KilnError {
    KilnError::Data(e.to_string())
}

/// Regression targets are trained standardised (so any optimizer and learning rate sees unit-scale values)
/// and reported in their own units: predictions are mapped back, losses multiplied by std^2.
#[derive(Clone, Copy, Debug)]
struct TargetScale {
    mean: f64,
    std: f64,
}

impl TargetScale {
    fn fit(train: &ArrayDataset) -> Option<TargetScale> {
        let v = train.values()?;
        let n = v.len().max(1) as f64;
        let mean = v.iter().map(|&t| t as f64).sum::<f64>() / n;
        let var = v.iter().map(|&t| (t as f64 - mean).powi(2)).sum::<f64>() / n;
        Some(TargetScale { mean, std: if var > 1e-24 { var.sqrt() } else { 1.0 } })
    }
    fn apply(&self, ds: &ArrayDataset) -> ArrayDataset {
        let mut d = ds.clone();
        if let Targets::Values(v) = &mut d.targets {
            v.iter_mut().for_each(|t| *t = ((*t as f64 - self.mean) / self.std) as f32);
        }
        d
    }
    fn loss(scale: Option<TargetScale>, loss: f64) -> f64 {
        scale.map(|s| loss * s.std * s.std).unwrap_or(loss)
    }
    fn outputs(scale: Option<TargetScale>, out: &mut [f32]) {
        if let Some(s) = scale {
            out.iter_mut().for_each(|o| *o = (*o as f64 * s.std + s.mean) as f32);
        }
    }
}

/// Loads and splits the data (see `kiln_data::load_split`), then scales it with training statistics: per
/// feature, or for convolutional models one mean and deviation over all pixels. polyreg expands one feature
/// first.
fn prepare(cfg: &TrainConfig, entry: &ModelEntry, degree: usize) -> Result<(Split, Scaling), KilnError> {
    let mut scaling = Scaling::default();
    let mut split = if entry.input == Input::OneFeature {
        let ds = kiln_data::load(&cfg.dataset, cfg.data_dir.as_deref()).map_err(data_err)?;
        let col = cfg.feature.unwrap_or(if ds.name == "diabetes" { 2 } else { 0 });
        if col >= ds.features {
            return Err(KilnError::Config(format!("feature {col} out of range: {} has {} features", ds.name, ds.features)));
        }
        // Scale the raw feature before taking powers, so x^d stays in a sane range.
        let one = ds.select_features(&[col]);
        let raw = Standardizer::fit(&one);
        scaling.feature = Some((col, raw.mean[0], raw.std[0]));
        let one = raw.apply(&one);
        Split::new(&kiln_data::polynomial_features(&one, degree), 0.2, 0.2, cfg.seed).map_err(data_err)?
    } else {
        kiln_data::load_split(&cfg.dataset, cfg.data_dir.as_deref(), cfg.seed).map_err(data_err)?
    };
    if let Some(limit) = cfg.train_limit {
        let keep: Vec<usize> = (0..limit.min(split.train.len())).collect();
        split.train = split.train.subset(&keep);
    }
    // Convolutional models see whole images: one mean and deviation for every pixel keeps the picture intact.
    if split.train.image.is_some() && entry.input == Input::Image {
        let n = split.train.x.len().max(1) as f64;
        let mean = split.train.x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (split.train.x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt().max(1e-12);
        (scaling.mean, scaling.std) = (vec![mean], vec![std]);
        return Ok((split.map(|d| d.with_features(d.x.iter().map(|&v| ((v as f64 - mean) / std) as f32).collect(), d.features)), scaling));
    }
    let scaler = Standardizer::fit(&split.train);
    // Constant features are centred, not scaled: their divisor is 1.
    (scaling.mean, scaling.std) = (scaler.mean.clone(), scaler.std.iter().map(|&s| if s > 1e-12 { s } else { 1.0 }).collect());
    Ok((split.map(|d| scaler.apply(d)), scaling))
}

/// How a run's inputs were normalised (statistics of its training split), written into its checkpoints so a
/// PyTorch user can feed the model the same numbers without recomputing them.
#[derive(Clone, Debug, Default)]
struct Scaling {
    /// x' = (x - mean) / std per feature; one value each for image models (every pixel alike).
    mean: Vec<f64>,
    std: Vec<f64>,
    /// Polynomial models: the feature column and its own standardisation, before its powers are taken.
    feature: Option<(usize, f64, f64)>,
    /// Regression: targets are trained as (y - mean) / std.
    target: Option<(f64, f64)>,
}

impl Scaling {
    fn metadata(&self) -> Vec<(&'static str, String)> {
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(",");
        let mut m = vec![("kiln.input_mean", list(&self.mean)), ("kiln.input_std", list(&self.std))];
        if let Some((col, mean, std)) = self.feature {
            m.extend([("kiln.feature_column", col.to_string()), ("kiln.feature_mean", format!("{mean:?}")), ("kiln.feature_std", format!("{std:?}"))]);
        }
        if let Some((mean, std)) = self.target {
            m.extend([("kiln.target_mean", format!("{mean:?}")), ("kiln.target_std", format!("{std:?}"))]);
        }
        m
    }
}

/// A batch's features and targets as tensors: x [n, features], labels u32 [n] or values f32 [n, 1].
fn features_and_targets(batch: &HostBatch) -> Result<(Tensor, Tensor), KilnError> {
    match <[Tensor; 2]>::try_from(batch.upload()?) {
        Ok([x, y]) => Ok((x, y)),
        Err(_) => Err(KilnError::Data("a batch of rows has two arrays, features and targets".into())),
    }
}

/// Rows `idx` of `ds`, collated and uploaded in one write.
fn upload_rows(ds: &ArrayDataset, idx: &[usize]) -> Result<(Tensor, Tensor), KilnError> {
    let samples = idx.iter().map(|&i| kiln_data::Dataset::get(ds, i)).collect::<Result<Vec<_>, _>>().map_err(data_err)?;
    features_and_targets(&HostBatch { indices: idx.to_vec(), arrays: StackRows::default().collate(samples).map_err(data_err)? })
}

/// Forward pass over a whole split without gradients: (mean loss, outputs row-major), both in the targets'
/// own units.
fn evaluate(model: &Model, ds: &ArrayDataset, scale: Option<TargetScale>) -> Result<(f64, Vec<f32>), KilnError> {
    no_grad(|| {
        let mut outputs = Vec::with_capacity(ds.len() * model.outputs);
        let mut loss_sum = 0.0;
        let all: Vec<usize> = (0..ds.len()).collect();
        for chunk in all.chunks(1000) {
            let (x, y) = upload_rows(ds, chunk)?;
            let out = model.forward(&x)?;
            let loss = model.task.loss(&out, &y)?;
            loss_sum += loss.to_scalar()? as f64 * chunk.len() as f64;
            outputs.extend(out.to_vec()?);
        }
        TargetScale::outputs(scale, &mut outputs);
        Ok((TargetScale::loss(scale, loss_sum / ds.len().max(1) as f64), outputs))
    })
}

/// Accuracy (classification) or R^2 (regression) of outputs on a split.
fn quality(task: Task, outputs: &[f32], width: usize, ds: &ArrayDataset) -> f64 {
    match &ds.targets {
        Targets::Classes { labels, .. } => metrics::accuracy(&task.predict(outputs, width), labels),
        Targets::Values(v) => metrics::r2(outputs, v),
    }
}

/// Trains one of the built-in models (`cfg.model`, see `registry::REGISTRY`) end to end and evaluates it on
/// the test split.
pub fn run(cfg: &TrainConfig, progress: impl FnMut(&Progress)) -> Result<TrainReport, KilnError> {
    run_with(registry::entry(&cfg.model)?, cfg, progress)
}

/// [`run`] with a model entry of one's own (a builder, the input it takes, its defaults). The run is named
/// by the entry (`cfg.model` is replaced by `entry.name`); evaluate its checkpoints with
/// [`evaluate_checkpoint_with`].
pub fn run_with(entry: &ModelEntry, cfg: &TrainConfig, progress: impl FnMut(&Progress)) -> Result<TrainReport, KilnError> {
    let cfg = &TrainConfig { model: entry.name.to_string(), ..cfg.clone() };
    // A run on named devices runs in the first one's scope: the main replica's model and data go there.
    if let Some(main) = cfg.devices.first() {
        if Device::current()? != *main {
            return main.scope(|| run_with(entry, cfg, progress));
        }
    }
    let started = Instant::now();
    // The thread's current device: the default one, or the device of an enclosing `Device::scope`.
    let g = Device::current()?;
    let mut r = setup(cfg, entry)?;
    let replicas = replicas(cfg, entry, &r)?;
    let across = cfg.distributed.as_ref().map(|d| &*d.0);
    if let Some(c) = across {
        agree_across_ranks(c, cfg, &r, replicas.len() + 1)?;
    }
    let parallel = !replicas.is_empty() || across.is_some();
    let rank0 = across.is_none_or(|c| c.rank() == 0);
    let all_reduce_ms = std::cell::Cell::new(0.0f64);
    let overlap = std::cell::Cell::new((0usize, 0usize));
    let mut checksum = String::new();
    let classifier = r.split.train.num_classes().is_some();
    let steps_per_epoch = r.split.train.len().div_ceil(r.s.batch_size) as u64;
    let (opt, model) = (&r.opt, &r.model);
    let mut trainer = Trainer::new(r.s.epochs, steps_per_epoch * r.s.epochs as u64);
    (trainer.started, trainer.start_epoch, trainer.best) = (started, r.start_epoch, r.best);
    // A resumed run numbers its steps on from the interrupted one's: augmentation is seeded by the step.
    trainer.first_step = opt.borrow().steps_taken();
    (trainer.resume_position, trainer.interrupt) = (r.resume_position, cfg.interrupt.clone());
    let mut trainer = trainer.callback(OnProgress(progress));
    if let Some(p) = cfg.patience {
        trainer = trainer.callback(EarlyStopping { patience: p });
    }
    if let (Some(dir), true) = (&cfg.out_dir, rank0) {
        std::fs::create_dir_all(dir).map_err(|e| KilnError::Io { path: dir.display().to_string(), message: format!("cannot create the directory: {e}") })?;
        let metric = if classifier { "dev_accuracy" } else { "dev_r2" };
        trainer = trainer.callback(MetricsCsv::open(dir.join("metrics.csv"), classifier, metric, cfg.resume.then_some(r.start_epoch))?);
        let every = cfg.checkpoint_every_s.unwrap_or(MID_EPOCH_CHECKPOINT_S);
        let (vs, s, split, scaling) = (&r.vs, &r.s, &r.split, &r.scaling);
        trainer = trainer.callback(RunCheckpoints { dir: dir.clone(), cfg, s, split, scaling, vs, opt, best: None, best_so_far: r.best, last_save: Instant::now(), mid_epoch_every_s: every });
    }
    let train_options = LoaderOptions { batch_size: r.s.batch_size, shuffle: Some(cfg.seed), drop_last: false, workers: 1, prefetch: 2 };
    let train_loader = DataLoader::shared(std::sync::Arc::new(r.split.train.clone()), StackRows::default(), train_options).map_err(data_err)?;
    let (augment, image) = (r.augment, r.split.train.image);
    let step = |batch: &HostBatch, step: u64| -> Result<StepValues, KilnError> {
        if parallel {
            let augment = augment.as_ref().zip(image).map(|(a, i)| (a, i, cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(step)));
            return data_parallel_step(&r, &replicas, cfg.distributed.as_ref(), batch, augment, &all_reduce_ms, &overlap, cfg.interrupt.as_deref(), cfg.sync_batch_norm);
        }
        let (mut x, y) = features_and_targets(batch)?;
        if let (Some(a), Some([c, h, w])) = (&augment, image) {
            x = x.reshape(&[batch.len(), c, h, w])?.augment(a, cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(step))?;
        }
        let model = model.borrow();
        let out = model.forward(&x)?;
        let loss = model.task.loss(&out, &y)?;
        let grads = loss.backward()?;
        opt.borrow_mut().step(&r.vs, &grads)?;
        drop(grads);
        Ok(StepValues { correct: model.task.correct(&out, &y)?, loss })
    };
    let mut evaluate = |t: EpochTally| -> Result<EpochRecord, KilnError> {
        if parallel {
            checksum = check_replicas(&r.vs, &replicas, across, t.epoch)?;
        }
        let mut m = model.borrow_mut();
        m.set_training(false);
        let (dev_loss, dev_out) = evaluate(&m, &r.split.dev, r.target_scale)?;
        m.set_training(true);
        let mut dev = [dev_loss, quality(m.task, &dev_out, m.outputs, &r.raw_split.dev)];
        if let Some(c) = across {
            // Rank 0's figures for every rank (its batch-norm statistics are its own): early stopping and the
            // best epoch then decide alike everywhere, and no rank stops while others wait for it.
            if c.rank() != 0 {
                dev = [0.0, 0.0];
            }
            c.sum_f64(&mut dev)?;
        }
        let [dev_loss, dev_metric] = dev;
        Ok(EpochRecord {
            epoch: t.epoch,
            train_loss: TargetScale::loss(r.target_scale, t.loss_sum / t.samples.max(1) as f64),
            train_accuracy: if classifier { t.correct_sum / t.samples.max(1) as f64 } else { f64::NAN },
            dev_loss,
            dev_metric,
            lr: opt.borrow().current_lr(),
            seconds: started.elapsed().as_secs_f64(),
            samples_per_s: t.samples as f64 / t.seconds.max(1e-9),
        })
    };
    model.borrow_mut().set_training(true);
    let fit = trainer.fit(&train_loader, step, &mut evaluate)?;
    drop(trainer);
    r.model.get_mut().set_training(false);
    let data_parallel = parallel.then(|| {
        let per_step = all_reduce_ms.get() / fit.steps.max(1) as f64;
        let step_ms = 1000.0 * fit.step_seconds / fit.steps.max(1) as f64;
        DataParallelReport {
            devices: std::iter::once(g.describe()).chain(replicas.iter().map(|p| p.device.describe())).collect(),
            ranks: across.map(|c| c.size()).unwrap_or(1),
            communicator: across.map(|c| c.describe()),
            gradient_bytes: r.opt.borrow().gradient_buffer().1 as u64 * 4,
            all_reduce_ms_per_step: per_step,
            communication_share: per_step / step_ms.max(1e-9),
            copies_started_in_backward: overlap.get().0 as f64 / overlap.get().1.max(1) as f64,
            checksum: checksum.clone(),
        }
    });
    let mut report = final_report(cfg, entry, &g, r, fit, started)?;
    report.data_parallel = data_parallel;
    Ok(report)
}

/// A replica of the run's model on another device (data parallelism; the main replica is the run's own).
struct Replica {
    device: Device,
    vs: VarStore,
    model: std::cell::RefCell<Model>,
    opt: std::cell::RefCell<Optimizer>,
}

/// The replicas on `cfg.devices[1..]`: each model built as the main one was, then given the main replica's
/// parameters, buffers and optimizer state (what `--from` or `--resume` loaded into it included).
fn replicas(cfg: &TrainConfig, entry: &ModelEntry, r: &RunSetup) -> Result<Vec<Replica>, KilnError> {
    let ranks = cfg.distributed.as_ref().map(|d| d.0.size()).unwrap_or(1);
    let replicas = cfg.devices.len().max(1) * ranks;
    // The batch is what is shared (it is at most the training set): a smaller one leaves replicas idle.
    if r.s.batch_size < replicas {
        let what = if ranks > 1 { format!("{ranks} ranks x {} devices", cfg.devices.len().max(1)) } else { format!("{} devices", cfg.devices.len()) };
        return Err(KilnError::Config(format!("a batch of {} ({} training samples) cannot be shared between {what}: give a --batch-size of at least {replicas}", r.s.batch_size, r.split.train.len())));
    }
    // Synchronised batch norm needs rows on every replica at every step (a replica without any would miss
    // the collectives): an epoch's last, short batch must still reach them all.
    let last = r.split.train.len() % r.s.batch_size;
    if cfg.sync_batch_norm && last > 0 && last < replicas {
        return Err(KilnError::Config(format!(
            "synchronised batch norm: each epoch ends with a batch of {last} rows ({} training samples, batches of {}), too few for {replicas} replicas; choose a --batch-size that leaves none or at least {replicas} (or --train-limit)",
            r.split.train.len(),
            r.s.batch_size
        )));
    }
    if cfg.devices.len() < 2 {
        return Ok(Vec::new());
    }
    let main = r.opt.borrow();
    let mut out = Vec::new();
    for device in &cfg.devices[1..] {
        let replica = device.scope(|| -> Result<Replica, KilnError> {
            let mut vs = VarStore::new(cfg.seed);
            let arch = linear_models::Arch { hidden: &r.s.hidden, depth: cfg.depth.unwrap_or(20), seed: cfg.seed };
            let mut model = (entry.build)(&mut vs, &r.split.train, &arch)?;
            vs.finish()?;
            model.net.set_sync_batch_norm(cfg.sync_batch_norm);
            let mut opt = Optimizer::new(&vs, main.kind, main.base_lr, main.weight_decay, main.schedule, main.total_steps)?;
            opt.clip = main.clip;
            if !cfg.freeze.is_empty() {
                opt.freeze(&vs, |name| cfg.freeze.iter().any(|p| name == p || name.starts_with(&format!("{p}."))));
            }
            model.net.set_rng_position(main.steps_taken());
            model.set_training(true);
            Ok(Replica { device: device.clone(), vs, model: std::cell::RefCell::new(model), opt: std::cell::RefCell::new(opt) })
        })?;
        out.push(replica);
    }
    drop(main);
    let mut guards: Vec<_> = out.iter().map(|p| p.opt.borrow_mut()).collect();
    let mut to: Vec<(&VarStore, &mut Optimizer)> = out.iter().zip(guards.iter_mut()).map(|(p, g)| (&p.vs, &mut **g)).collect();
    kiln_nn::parallel::broadcast((&r.vs, &r.opt.borrow()), &mut to, true)?;
    drop(to);
    drop(guards);
    Ok(out)
}

/// One data-parallel step: each replica's forward and backward on its shard of the batch, on its own device;
/// the gradients averaged across the replicas, weighted by their shares; every replica's update. The step's
/// loss (the mean over the whole batch) and correct count are read back with the gradients.
#[allow(clippy::too_many_arguments)]
fn data_parallel_step(
    r: &RunSetup,
    replicas: &[Replica],
    across: Option<&kiln_nn::parallel::Distributed>,
    batch: &HostBatch,
    augment: Option<(&kiln_graph::Augment, [usize; 3], u64)>,
    all_reduce_ms: &std::cell::Cell<f64>,
    overlap: &std::cell::Cell<(usize, usize)>,
    interrupt: Option<&std::sync::atomic::AtomicBool>,
    sync_batch_norm: bool,
) -> Result<StepValues, KilnError> {
    use kiln_nn::parallel::{in_shard, GroupMember, OverlappedAllReduce, ShardContext, ThreadGroup};
    let main = Device::current()?;
    // This rank's replicas take their rows of the whole batch (each rank loads the same seeded batches: rank
    // r's rows are the r-th block of them, so no two ranks share a sample).
    let local = replicas.len() + 1;
    let (rank, ranks) = across.map(|c| (c.0.rank(), c.0.size())).unwrap_or((0, 1));
    let shards = kiln_nn::parallel::shard_ranges(batch.len(), local * ranks)[rank * local..(rank + 1) * local].to_vec();
    let parts: Vec<(&Device, &std::cell::RefCell<Model>, &std::cell::RefCell<Optimizer>)> =
        std::iter::once((&main, &r.model, &r.opt)).chain(replicas.iter().map(|p| (&p.device, &p.model, &p.opt))).collect();
    let mut reads = Vec::new();
    // The all-reduce starts inside the backward passes: each bucket's copy as soon as its gradients are final.
    // Replicas that run one after the other, all with rows (on every rank), also sum the buckets during it.
    let stream = {
        let opts: Vec<_> = parts.iter().map(|(_, _, o)| o.borrow()).collect();
        let opts: Vec<&Optimizer> = opts.iter().map(|o| &**o).collect();
        let mut stream = OverlappedAllReduce::new(&opts, kiln_nn::parallel::DEFAULT_BUCKET_BYTES)?;
        if !sync_batch_norm && batch.len() >= local * ranks {
            stream.reduce_eagerly(&opts, shards.iter().map(|rows| rows.len() as f64 / batch.len() as f64).collect());
        }
        std::sync::Mutex::new(stream)
    };
    if sync_batch_norm {
        // Batch norm's statistics are summed over the replicas layer by layer, so their passes run at once, one
        // thread each; the first replica stays on this thread (it also sums across the ranks).
        if shards.iter().any(|s| s.is_empty()) {
            return Err(KilnError::Config(format!("synchronised batch norm: a batch of {} rows leaves a replica without rows ({} replicas)", batch.len(), local * ranks)));
        }
        let group = ThreadGroup::new(local);
        let member = |index: usize, rows: &std::ops::Range<usize>, across: Option<kiln_nn::parallel::Distributed>| {
            let m = GroupMember { group: group.clone(), index, weight: rows.len() as f64 / batch.len() as f64, across };
            ShardContext { first_row: rows.start, stats: Some(std::rc::Rc::new(m) as std::rc::Rc<dyn kiln_nn::parallel::StatsReducer>) }
        };
        // One replica's pass, the group ended if it fails (so no other replica waits for it).
        let pass = |index: usize, device: &Device, model: &Model, opt: &mut Optimizer, ctx: ShardContext| -> Result<(Vec<f32>, usize), KilnError> {
            let rows = shards[index].clone();
            let shard = batch.rows(rows.clone());
            let out = device.scope(|| in_shard(ctx, || -> Result<Vec<f32>, KilnError> { shard_pass(model, opt, (&stream, index, None), &shard, &rows, augment)?.to_vec() }));
            if let Err(e) = &out {
                group.fail(&format!("replica {index} failed: {e}"));
            }
            out.map(|v| (v, rows.len()))
        };
        let models: Vec<_> = parts.iter().map(|(_, m, _)| m.borrow()).collect();
        let mut opts: Vec<_> = parts.iter().map(|(_, _, o)| o.borrow_mut()).collect();
        let (first_opt, other_opts) = opts.split_first_mut().expect("one replica at least");
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = other_opts
                .iter_mut()
                .enumerate()
                .map(|(i, opt)| {
                    let (index, device, model, opt, pass, member, rows) = (i + 1, parts[i + 1].0, &*models[i + 1], &mut **opt, &pass, &member, shards[i + 1].clone());
                    scope.spawn(move || pass(index, device, model, opt, member(index, &rows, None)))
                })
                .collect();
            let mut results = vec![pass(0, &main, &models[0], first_opt, member(0, &shards[0], across.cloned()))];
            results.extend(handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(KilnError::Usage("a data-parallel replica's thread panicked".into())))));
            results
        });
        drop((models, opts));
        // The cause, rather than another replica's report of it.
        let consequence = |e: &KilnError| e.to_string().starts_with("synchronised batch norm: replica");
        if results.iter().any(Result::is_err) {
            let mut errors: Vec<KilnError> = results.into_iter().filter_map(Result::err).collect();
            let cause = errors.iter().position(|e| !consequence(e)).unwrap_or(0);
            return Err(errors.swap_remove(cause));
        }
        reads.extend(results.into_iter().map(|r| r.map(|(v, n)| StepRead::Done(v, n))).collect::<Result<Vec<_>, KilnError>>()?);
    } else {
        for (index, ((device, model, opt), rows)) in parts.iter().zip(&shards).enumerate() {
            if rows.is_empty() {
                continue;
            }
            let shard = batch.rows(rows.clone());
            let ctx = ShardContext { first_row: rows.start, stats: None };
            let values = device.scope(|| in_shard(ctx, || shard_pass(&model.borrow(), &mut opt.borrow_mut(), (&stream, index, across.map(|c| &*c.0)), &shard, rows, augment)))?;
            reads.push(StepRead::Pending(device.scope(|| values.read_start())?, rows.len()));
        }
    }
    let mut guards: Vec<_> = parts.iter().map(|(_, _, opt)| opt.borrow_mut()).collect();
    let mut opts: Vec<&mut Optimizer> = guards.iter_mut().map(|g| &mut **g).collect();
    let shares: Vec<usize> = shards.iter().map(|s| s.len()).collect();
    // Every backward done first, so the timing is what the all-reduce adds to the step (the copies of the last
    // layers' buckets have run during the backward; the first layers' wait for all of it in any case).
    for (device, _, _) in &parts {
        device.sync()?;
    }
    let stream = stream.into_inner().unwrap_or_else(|e| e.into_inner());
    let timing = stream.finish(&mut opts, &shares, batch.len(), across.map(|c| &*c.0))?;
    all_reduce_ms.set(all_reduce_ms.get() + timing.total_ms);
    overlap.set((overlap.get().0 + timing.overlapped_buckets, overlap.get().1 + timing.bucket_copies));
    let stores: Vec<&VarStore> = std::iter::once(&r.vs).chain(replicas.iter().map(|p| &p.vs)).collect();
    for ((opt, vs), (device, _, _)) in opts.iter_mut().zip(stores).zip(&parts) {
        device.scope(|| opt.apply(vs))?;
    }
    let (mut loss_sum, mut correct, with_correct) = (0.0f64, 0.0f64, r.split.train.num_classes().is_some());
    for read in reads {
        let (v, n) = match read {
            StepRead::Pending(read, n) => (read.wait()?, n),
            StepRead::Done(v, n) => (v, n),
        };
        loss_sum += v[0] as f64 * n as f64;
        correct += v.get(1).copied().unwrap_or(0.0) as f64;
    }
    if let Some(c) = across {
        // A Ctrl-C seen by any rank stops every rank after the same step (rank 0 saves where they are).
        let stop = interrupt.is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        let mut sums = [loss_sum, correct, f64::from(u8::from(stop))];
        c.0.sum_f64(&mut sums)?;
        [loss_sum, correct] = [sums[0], sums[1]];
        if let (true, Some(f)) = (sums[2] > 0.0, interrupt) {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let loss = Tensor::from_slice(&[(loss_sum / batch.len().max(1) as f64) as f32], &[1])?;
    let correct = if with_correct { Some(Tensor::from_slice(&[correct as f32], &[1])?) } else { None };
    Ok(StepValues { loss, correct })
}

/// A replica's share of a step's readings: its loss (and correct count) and its rows.
enum StepRead {
    Pending(kiln_graph::PendingValues, usize),
    Done(Vec<f32>, usize),
}

/// One replica's forward and backward on its shard (rows `rows` of the step's batch), each gradient gathered
/// into its optimizer's flat buffer as soon as it is final and handed to the step's all-reduce (`stream`, this
/// replica's index in it). Returns [loss] or [loss, correct] as a tensor.
fn shard_pass(
    model: &Model,
    opt: &mut Optimizer,
    (stream, index, across): (&std::sync::Mutex<kiln_nn::parallel::OverlappedAllReduce>, usize, Option<&dyn kiln_nn::parallel::Collective>),
    shard: &HostBatch,
    rows: &std::ops::Range<usize>,
    augment: Option<(&kiln_graph::Augment, [usize; 3], u64)>,
) -> Result<Tensor, KilnError> {
    let (mut x, y) = features_and_targets(shard)?;
    if let Some((a, [c, h, w], seed)) = augment {
        // Seeded by the step and the shard's first row, so no two shards share their draws.
        x = x.reshape(&[shard.len(), c, h, w])?.augment(a, seed.wrapping_add((rows.start as u64) << 40))?;
    }
    let out = model.forward(&x)?;
    let loss = model.task.loss(&out, &y)?;
    let lock = || stream.lock().unwrap_or_else(|e| e.into_inner());
    opt.begin_accumulate()?;
    let grads = loss.backward_with(&mut |leaf, g| {
        if let Some(slot) = opt.accumulate_param(leaf, g)? {
            lock().gradient_ready(index, opt, slot, across)?;
        }
        Ok(())
    })?;
    drop(grads);
    lock().backward_done(index, opt)?;
    let correct = model.task.correct(&out, &y)?;
    Ok(match &correct {
        Some(c) => no_grad(|| Tensor::concat(&[&loss.reshape(&[1])?, &c.reshape(&[1])?], 0))?,
        None => loss.reshape(&[1])?,
    })
}

/// At an epoch end: the main replica's buffers (batch norm's running statistics, which each replica updates
/// from its own shards) copied to the others, then every replica's checksum compared. Replicas that differ are
/// an error (they cannot, unless a kernel is not deterministic). Returns the checksum.
fn check_replicas(main: &VarStore, replicas: &[Replica], across: Option<&dyn kiln_nn::parallel::Collective>, epoch: usize) -> Result<String, KilnError> {
    let others: Vec<&VarStore> = replicas.iter().map(|p| &p.vs).collect();
    kiln_nn::parallel::broadcast_buffers(main, &others)?;
    let want = kiln_nn::parallel::checksum(main)?;
    for (i, p) in replicas.iter().enumerate() {
        let got = kiln_nn::parallel::checksum(&p.vs)?;
        if got != want {
            return Err(KilnError::Training(format!("epoch {epoch}: replica {} ({}) drifted from replica 0: parameter checksums {got:016x} and {want:016x}", i + 1, p.device.describe())));
        }
    }
    if let Some(c) = across {
        // Batch norm's buffers differ between ranks (each updates them from its own rows): the parameters
        // alone are compared across ranks, and rank 0's buffers are the ones its checkpoints keep.
        let params = kiln_nn::parallel::checksum_parameters(main)?;
        let all = c.all_gather_u64(params)?;
        if let Some(bad) = all.iter().position(|&v| v != all[0]) {
            return Err(KilnError::Training(format!("epoch {epoch}: rank {bad}'s parameters drifted from rank 0's (checksums {:016x} and {:016x})", all[bad], all[0])));
        }
    }
    Ok(format!("{want:016x}"))
}

/// Before the first step of a distributed run: every rank must run the same Kiln, model, data and settings
/// from the same parameters. A hash of them is exchanged; a rank that differs is an error on every rank,
/// naming it (instead of a hang or a silent mix).
fn agree_across_ranks(c: &dyn kiln_nn::parallel::Collective, cfg: &TrainConfig, r: &RunSetup, local_devices: usize) -> Result<(), KilnError> {
    // Everything that steers the loop, and the adapter's kind (replicas must round alike).
    let summary = format!(
        "{} {} {} {:?} {} {} {} {:016x} {:?} {:?} {:?} {:?} {:?} {:?} {} {}",
        env!("CARGO_PKG_VERSION"),
        cfg.model,
        cfg.dataset,
        r.s,
        r.split.train.len(),
        r.vs.flat_len(),
        local_devices,
        kiln_nn::parallel::checksum_parameters(&r.vs)?,
        cfg.patience,
        cfg.freeze,
        cfg.resume,
        cfg.from,
        cfg.depth,
        r.opt.borrow().clip,
        Device::current()?.adapter_name(),
        cfg.sync_batch_norm
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in summary.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let all = c.all_gather_u64(h)?;
    if let Some(bad) = all.iter().position(|&v| v != all[0]) {
        return Err(KilnError::Config(format!(
            "rank {bad} runs another Kiln version, model, data set, settings, device count, adapter kind or starting point than rank 0 (hashes {:016x} and {:016x}); every rank must run the same command on adapters of one kind",
            all[bad], all[0]
        )));
    }
    Ok(())
}

/// Everything a run sets up before its first epoch: data, settings, model, optimizer, and what a resumed
/// run or a transfer loads.
struct RunSetup {
    raw_split: Split,
    split: Split,
    target_scale: Option<TargetScale>,
    scaling: Scaling,
    s: Settings,
    vs: VarStore,
    /// Shared by the step function and the callbacks (never borrowed by two at once).
    model: std::cell::RefCell<Model>,
    opt: std::cell::RefCell<Optimizer>,
    augment: Option<kiln_graph::Augment>,
    start_epoch: usize,
    best: (f64, usize),
    /// Resumed in the middle of `start_epoch`: the batches of it done and their sums.
    resume_position: Option<(usize, EpochTally)>,
    frozen: Vec<String>,
    loaded_from_checkpoint: Vec<String>,
}

fn setup(cfg: &TrainConfig, entry: &ModelEntry) -> Result<RunSetup, KilnError> {
    let (raw_split, mut scaling) = prepare(cfg, entry, cfg.degree.unwrap_or(1))?;
    let target_scale = TargetScale::fit(&raw_split.train);
    scaling.target = target_scale.map(|t| (t.mean, t.std));
    let split = match target_scale {
        Some(ts) => raw_split.map(|d| ts.apply(d)),
        None => raw_split.clone(),
    };
    let (mut s, opt_kind, schedule) = settings(cfg, entry, split.train.len())?;
    if cfg.degree.is_some() && entry.input != Input::OneFeature {
        return Err(KilnError::Config(format!("--degree applies to polynomial models only, not {}", cfg.model)));
    }
    let mut vs = VarStore::new(cfg.seed);
    let arch = linear_models::Arch { hidden: &s.hidden, depth: cfg.depth.unwrap_or(20), seed: cfg.seed };
    let mut model = (entry.build)(&mut vs, &split.train, &arch)?;
    vs.finish()?;
    model.net.set_sync_batch_norm(cfg.sync_batch_norm);
    let augment = cfg.augment.or((entry.defaults)(&cfg.dataset).augment);
    s.augment = augment.map(|a| format!("{a:?}")).unwrap_or_default();
    if augment.is_some_and(|a| !a.is_identity()) && !(entry.input == Input::Image && split.train.image.is_some()) {
        return Err(KilnError::Config("--augment needs a convolutional model on an image data set".into()));
    }
    let total_steps = split.train.len().div_ceil(s.batch_size) as u64 * s.epochs as u64;
    let opt = Optimizer::new(&vs, opt_kind, s.lr, s.weight_decay, schedule, total_steps)?;
    let (model, opt) = (std::cell::RefCell::new(model), std::cell::RefCell::new(opt));
    let mut r = RunSetup {
        raw_split,
        split,
        target_scale,
        scaling,
        s,
        vs,
        model,
        opt,
        augment,
        start_epoch: 1,
        best: (f64::NEG_INFINITY, 0),
        resume_position: None,
        frozen: Vec::new(),
        loaded_from_checkpoint: Vec::new(),
    };
    load_transfer_and_freeze(cfg, &mut r)?;
    if cfg.resume {
        resume(cfg, &mut r)?;
    }
    Ok(r)
}

/// `--from` (every parameter whose name and shape match) and `--freeze`.
fn load_transfer_and_freeze(cfg: &TrainConfig, r: &mut RunSetup) -> Result<(), KilnError> {
    if let Some(from) = &cfg.from {
        let ck = checkpoint::load(from).map_err(ck_err)?;
        // Transfer: a new head of another size starts fresh.
        let vs = &r.vs;
        let matching = |name: &str| ck.get(name).is_some_and(|t| vs.params().any(|p| p.name() == name && p.shape() == &t.shape[..]));
        r.loaded_from_checkpoint = r.vs.load_checkpoint(&from.display().to_string(), &ck, false, matching).map_err(ck_err)?;
        if r.loaded_from_checkpoint.is_empty() {
            return Err(KilnError::Checkpoint(format!("{}: no parameter of this {} matches the checkpoint by name and shape", from.display(), cfg.model)));
        }
    }
    if !cfg.freeze.is_empty() {
        r.frozen = r.opt.get_mut().freeze(&r.vs, |name| cfg.freeze.iter().any(|p| name == p || name.starts_with(&format!("{p}."))));
        if r.frozen.is_empty() {
            let names: Vec<&str> = r.vs.params().map(|p| p.name()).collect();
            return Err(KilnError::Config(format!("--freeze {:?} matches no parameter; names are {}", cfg.freeze, names.join(", "))));
        }
    }
    Ok(())
}

/// `--resume`: parameters, optimizer state, epoch (and the batch reached in it) and best metric from the run
/// directory's resume.safetensors (or, from runs before it existed, last.safetensors and
/// last.optimizer.safetensors).
fn resume(cfg: &TrainConfig, r: &mut RunSetup) -> Result<(), KilnError> {
    let dir = cfg.out_dir.as_ref().ok_or_else(|| KilnError::Config("--resume needs the run directory (--out)".into()))?;
    let state = dir.join("resume.safetensors");
    let (path, ck, opt_path, opt_ck) = if state.exists() {
        let ck = checkpoint::load(&state).map_err(ck_err)?;
        (state.clone(), ck.clone(), state, ck)
    } else {
        let (last, last_opt) = (dir.join("last.safetensors"), dir.join("last.optimizer.safetensors"));
        (last.clone(), checkpoint::load(&last).map_err(ck_err)?, last_opt.clone(), checkpoint::load(&last_opt).map_err(ck_err)?)
    };
    let meta = |k: &str| ck.metadata.get(k).cloned().unwrap_or_default();
    if meta("kiln.model") != cfg.model {
        return Err(KilnError::Checkpoint(format!("{} holds a {:?}, not a {}", path.display(), meta("kiln.model"), cfg.model)));
    }
    r.vs.load_checkpoint(&path.display().to_string(), &ck, true, |_| true).map_err(ck_err)?;
    r.opt.get_mut().load_state(&opt_path.display().to_string(), &opt_ck).map_err(ck_err)?;
    let steps = r.opt.get_mut().steps_taken();
    r.model.get_mut().net.set_rng_position(steps);
    let number = |k: &str| meta(k).parse::<f64>().map_err(|_| KilnError::Checkpoint(format!("{}: {k} in the metadata is {:?}, not a number", path.display(), meta(k))));
    // The position means batches of this size over this many samples: another --batch-size or --train-limit
    // would skip other batches.
    for (key, now) in [("kiln.batch_size", r.s.batch_size), ("kiln.train_samples", r.split.train.len())] {
        if let Ok(then) = meta(key).parse::<usize>() {
            if then != now {
                return Err(KilnError::Config(format!("{} was written by a run with {key} = {then}; this one has {now}: resume with the same settings", path.display())));
            }
        }
    }
    r.start_epoch = number("kiln.epoch")? as usize + 1;
    r.best = (meta("kiln.best_dev_metric").parse().unwrap_or(f64::NEG_INFINITY), meta("kiln.best_epoch").parse().unwrap_or(0));
    let batches = meta("kiln.epoch_batches").parse::<usize>().unwrap_or(0);
    if batches > 0 {
        let tally = EpochTally {
            epoch: r.start_epoch,
            samples: number("kiln.epoch_samples")? as usize,
            loss_sum: number("kiln.epoch_loss_sum")?,
            correct_sum: number("kiln.epoch_correct_sum")?,
            seconds: 0.0,
        };
        r.resume_position = Some((batches, tally));
    }
    Ok(())
}

/// Writes a run's checkpoints: best.safetensors when the dev metric improves (kept on the host until the next
/// write); last.safetensors (the weights, PyTorch's names) and resume.safetensors (the weights, the
/// optimizer's state and where the run stands, in one file written atomically, so a crash at any instant
/// leaves a consistent one) at most every few seconds at epoch ends, at the run's last epoch, every
/// `mid_epoch_every_s` within an epoch, and when the run is interrupted; loss.png at epoch ends.
struct RunCheckpoints<'a> {
    dir: PathBuf,
    cfg: &'a TrainConfig,
    s: &'a Settings,
    split: &'a Split,
    scaling: &'a Scaling,
    vs: &'a VarStore,
    opt: &'a std::cell::RefCell<Optimizer>,
    best: Option<checkpoint::Checkpoint>,
    /// The best dev metric and its epoch, as of the last epoch end.
    best_so_far: (f64, usize),
    last_save: Instant,
    mid_epoch_every_s: f64,
}

impl RunCheckpoints<'_> {
    /// Writes resume.safetensors, then last.safetensors, then a best checkpoint if one is waiting.
    fn save(&mut self, metadata: std::collections::BTreeMap<String, String>) -> Result<(), KilnError> {
        let mut weights = self.vs.to_checkpoint()?;
        weights.metadata = metadata;
        let optimizer = self.opt.borrow().state_checkpoint(self.vs)?;
        let mut state = weights.clone();
        state.tensors.extend(optimizer.tensors);
        state.int64.extend(optimizer.int64);
        state.metadata.extend(optimizer.metadata);
        // resume.safetensors last: a crash between the writes leaves best and last at or ahead of the point a
        // resumed run starts from, which it then reaches again; never a best file its metadata has not seen.
        if let Some(best) = self.best.take() {
            checkpoint::save(&self.dir.join("best.safetensors"), &best).map_err(ck_err)?;
        }
        checkpoint::save(&self.dir.join("last.safetensors"), &weights).map_err(ck_err)?;
        checkpoint::save(&self.dir.join("resume.safetensors"), &state).map_err(ck_err)?;
        self.last_save = Instant::now();
        Ok(())
    }
}

impl Callback for RunCheckpoints<'_> {
    fn save_due(&mut self) -> bool {
        self.last_save.elapsed().as_secs_f64() >= self.mid_epoch_every_s
    }

    fn on_position(&mut self, p: &Position) -> Result<(), KilnError> {
        let (best, best_epoch) = self.best_so_far;
        let mut meta = run_metadata(self.cfg, self.s, self.split, self.scaling, p.epoch - 1, best, best_epoch);
        // f64's Debug form reads back to the same bits: the resumed epoch's sums are exact.
        for (k, v) in [
            ("kiln.epoch_batches", p.batches_done.to_string()),
            ("kiln.epoch_samples", p.tally.samples.to_string()),
            ("kiln.epoch_loss_sum", format!("{:?}", p.tally.loss_sum)),
            ("kiln.epoch_correct_sum", format!("{:?}", p.tally.correct_sum)),
        ] {
            meta.insert(k.into(), v);
        }
        self.save(meta)
    }

    fn on_epoch_end(&mut self, end: &EpochEnd) -> Result<(), KilnError> {
        let epoch = end.record.epoch;
        self.best_so_far = (end.best_metric, end.best_epoch);
        let meta = || run_metadata(self.cfg, self.s, self.split, self.scaling, epoch, end.best_metric, end.best_epoch);
        if end.improved {
            let mut ck = self.vs.to_checkpoint()?;
            ck.metadata = meta();
            self.best = Some(ck);
        }
        if end.last || self.last_save.elapsed().as_secs_f64() >= CHECKPOINT_EVERY_S {
            self.save(meta())?;
            let train: Vec<f64> = end.history.iter().map(|h| h.train_loss).collect();
            let dev: Vec<f64> = end.history.iter().map(|h| h.dev_loss).collect();
            let png = self.dir.join("loss.png");
            crate::plot::loss_png(&png, &train, &dev).map_err(|e| KilnError::Io { path: png.display().to_string(), message: format!("cannot write the plot: {e}") })?;
        }
        Ok(())
    }
}

/// The test-split evaluation and the run's figures.
fn final_report(cfg: &TrainConfig, entry: &ModelEntry, g: &Device, r: RunSetup, fit: FitReport, started: Instant) -> Result<TrainReport, KilnError> {
    let end_stats = g.stats();
    let model = r.model.into_inner();
    let (test_loss, test_out) = evaluate(&model, &r.split.test, r.target_scale)?;
    let (train_eval_loss, _) = evaluate(&model, &r.split.train, r.target_scale)?;
    let mut report = TrainReport {
        model: cfg.model.clone(),
        dataset: r.split.train.name.clone(),
        adapter: g.adapter_name(),
        backend: g.backend(),
        epochs: r.s.epochs,
        steps: fit.steps,
        train_samples: r.split.train.len(),
        test_samples: r.split.test.len(),
        train_loss: train_eval_loss,
        dev_loss: fit.history.last().map(|h| h.dev_loss).unwrap_or(f64::NAN),
        test_loss,
        test: TestMetrics::of(&model, &test_out, &r.raw_split.test.targets),
        normal_equation_cost: None,
        train_cost: None,
        seconds: started.elapsed().as_secs_f64(),
        samples_per_s: fit.samples_seen as f64 / fit.step_seconds.max(1e-9),
        ms_per_step: 1000.0 * fit.step_seconds / fit.steps.max(1) as f64,
        seconds_to_first_step: fit.first_step_seconds.unwrap_or(0.0),
        submits_per_step: (fit.steady_steps > 0).then(|| fit.steady_submits as f64 / fit.steady_steps as f64),
        buffers_created_after_first_step: fit.steady_buffers,
        peak_gpu_bytes: end_stats.peak_live_bytes,
        parameters: r.vs.num_values(),
        settings: r.s,
        history: fit.history,
        best_dev_metric: fit.best_metric,
        best_epoch: fit.best_epoch,
        stopped_early: fit.stopped_early,
        frozen: r.frozen,
        loaded_from_checkpoint: r.loaded_from_checkpoint,
        data_parallel: None,
    };
    if entry.normal_equation {
        let train_y = r.raw_split.train.values().unwrap_or(&[]);
        report.normal_equation_cost = normal_equation(&r.raw_split.train.x, r.raw_split.train.features, train_y).map(|(_, c)| c);
        report.train_cost = Some(train_eval_loss / 2.0);
    }
    Ok(report)
}
