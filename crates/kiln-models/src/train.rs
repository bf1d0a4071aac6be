//! The training loop shared by `kiln train`, the examples and the tests: load and prepare the data, build the
//! model, run mini-batch epochs (one submit per step: the loss readback), evaluate, report.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use kiln_data::{ArrayDataset, Collate, DataLoader, HostBatch, LoaderOptions, Split, StackRows, Standardizer, Targets};
use kiln_graph::backend::Device;
use kiln_graph::{no_grad, KilnError, Tensor};
use kiln_nn::metrics;
use kiln_nn::schedule::Schedule;
use kiln_nn::checkpoint;
use kiln_nn::{Module, Optimizer, OptimizerKind, VarStore};
use serde::Serialize;

use crate::linear_models::{self, normal_equation, Model, Task};

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

/// Defaults per model: what trains well on its usual data set.
fn settings(cfg: &TrainConfig, train_len: usize) -> Result<(Settings, OptimizerKind, Schedule), KilnError> {
    let (epochs, batch, lr, opt): (usize, usize, f32, OptimizerKind) = match cfg.model.as_str() {
        // Full-batch gradient descent, as the course derives it.
        "linreg" => (500, train_len, 0.1, OptimizerKind::Gd),
        "polyreg" => (600, train_len, 0.05, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }),
        "logreg" => (500, train_len, 0.5, OptimizerKind::Gd),
        "softmax" => (100, 64, 0.05, OptimizerKind::Sgd { momentum: 0.9, nesterov: false }),
        "mlp" => (30, 32, 1e-3, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }),
        // The 10k MNIST digits are few for LeNet: longer, regularised training (with augmentation, below).
        "lenet" if cfg.dataset == "mnist" => (40, 64, 1e-3, OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 }),
        "lenet" => (10, 64, 1e-3, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }),
        "resnet" => (12, 64, 1e-3, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }),
        other => {
            let names: Vec<&str> = linear_models::MODELS.iter().map(|m| m.0).collect();
            return Err(KilnError::Backward(format!("unknown model {other:?}; available: {}", names.join(", "))));
        }
    };
    let s = Settings {
        epochs: cfg.epochs.unwrap_or(epochs),
        batch_size: cfg.batch_size.unwrap_or(batch).min(train_len.max(1)),
        lr: cfg.lr.unwrap_or(lr),
        optimizer: String::new(),
        weight_decay: cfg.weight_decay.unwrap_or(if cfg.model == "lenet" && cfg.dataset == "mnist" { 1e-4 } else { 0.0 }),
        schedule: String::new(),
        hidden: cfg.hidden.clone().unwrap_or_else(|| vec![128]),
        degree: cfg.degree.unwrap_or(1),
        seed: cfg.seed,
        augment: String::new(),
    };
    if s.epochs == 0 || s.batch_size == 0 || !(s.lr > 0.0 && s.lr.is_finite()) || s.weight_decay < 0.0 || s.hidden.contains(&0) || s.degree == 0 {
        return Err(KilnError::Backward(format!(
            "invalid settings: epochs {} and batch size {} must be >= 1, lr {} must be > 0, weight decay {} >= 0, hidden sizes {:?} >= 1, degree {} >= 1",
            s.epochs, s.batch_size, s.lr, s.weight_decay, s.hidden, s.degree
        )));
    }
    let opt = cfg.optimizer.unwrap_or(opt);
    // Cosine decay where it measured better (ResNet-20, LeNet on MNIST-10k).
    let cosine = cfg.model == "resnet" || (cfg.model == "lenet" && cfg.dataset == "mnist");
    let sched = cfg.schedule.unwrap_or(if cosine { Schedule { kind: kiln_nn::LrSchedule::Cosine { min_factor: 0.0 }, warmup: 0 } } else { Schedule::constant() });
    Ok((Settings { optimizer: format!("{opt:?}"), schedule: format!("{sched:?}"), ..s }, opt, sched))
}

/// One progress update (per step, and with `dev` filled at each epoch end).
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
    /// Accuracy on the training batches as they were trained (classifiers; NaN for regression).
    pub train_accuracy: f64,
    pub dev_loss: f64,
    /// Accuracy for classifiers, R^2 for regression.
    pub dev_metric: f64,
    pub lr: f32,
    pub seconds: f64,
    pub samples_per_s: f64,
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
    pub submits_per_step: f64,
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
}

/// Seconds between checkpoint writes within a run (the last epoch is always written).
const CHECKPOINT_EVERY_S: f64 = 5.0;

fn ck_err(e: checkpoint::CheckpointError) -> KilnError {
    KilnError::Backward(e.to_string())
}

/// What a checkpoint records about its run, so `kiln eval` and `--resume` can rebuild the model.
fn run_metadata(cfg: &TrainConfig, s: &Settings, split: &Split, epoch: usize, best: f64, best_epoch: usize) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    let hidden: Vec<String> = s.hidden.iter().map(|h| h.to_string()).collect();
    for (k, v) in [
        ("kiln.model", cfg.model.clone()),
        ("kiln.dataset", cfg.dataset.clone()),
        ("kiln.epoch", epoch.to_string()),
        ("kiln.hidden", hidden.join(",")),
        ("kiln.depth", cfg.depth.map(|v| v.to_string()).unwrap_or_default()),
        ("kiln.seed", cfg.seed.to_string()),
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
    // The thread's current device: the default one, or the device of an enclosing `Device::scope`.
    let g = Device::current()?;
    let ck = checkpoint::load(path).map_err(ck_err)?;
    let meta = |k: &str| ck.metadata.get(k).cloned();
    let model_name = meta("kiln.model").ok_or_else(|| KilnError::Backward(format!("{}: not a Kiln training checkpoint (no kiln.model in the metadata)", path.display())))?;
    let dataset = dataset.map(str::to_string).or_else(|| meta("kiln.dataset")).unwrap_or_default();
    let seed = meta("kiln.seed").and_then(|v| v.parse().ok()).unwrap_or(42);
    let hidden: Vec<usize> = meta("kiln.hidden").unwrap_or_default().split(',').filter_map(|h| h.parse().ok()).collect();
    let num = |k: &str| meta(k).and_then(|v| v.parse::<usize>().ok());
    let cfg = TrainConfig { seed, data_dir, train_limit: num("kiln.train_limit"), degree: num("kiln.degree"), feature: num("kiln.feature"), ..TrainConfig::new(&model_name, &dataset) };
    let split = prepare(&cfg, cfg.degree.unwrap_or(1))?;
    let mut vs = VarStore::new(seed);
    let arch = linear_models::Arch { hidden: &hidden, depth: num("kiln.depth").unwrap_or(20), seed };
    let mut model = linear_models::build(&model_name, &mut vs, split.test.features, split.test.image, split.test.num_classes(), &arch)?;
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
    Ok(EvalReport { checkpoint: path.display().to_string(), model: model_name, dataset, adapter: g.adapter_name(), test_samples: split.test.len(), test_loss, test })
}

fn data_err(e: kiln_data::DataError) -> KilnError {
    KilnError::Backward(e.to_string())
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
fn prepare(cfg: &TrainConfig, degree: usize) -> Result<Split, KilnError> {
    let mut split = if cfg.model == "polyreg" {
        let ds = kiln_data::load(&cfg.dataset, cfg.data_dir.as_deref()).map_err(data_err)?;
        let col = cfg.feature.unwrap_or(if ds.name == "diabetes" { 2 } else { 0 });
        if col >= ds.features {
            return Err(KilnError::Backward(format!("feature {col} out of range: {} has {} features", ds.name, ds.features)));
        }
        // Scale the raw feature before taking powers, so x^d stays in a sane range.
        let one = ds.select_features(&[col]);
        let one = Standardizer::fit(&one).apply(&one);
        Split::new(&kiln_data::polynomial_features(&one, degree), 0.2, 0.2, cfg.seed).map_err(data_err)?
    } else {
        kiln_data::load_split(&cfg.dataset, cfg.data_dir.as_deref(), cfg.seed).map_err(data_err)?
    };
    if let Some(limit) = cfg.train_limit {
        let keep: Vec<usize> = (0..limit.min(split.train.len())).collect();
        split.train = split.train.subset(&keep);
    }
    // Convolutional models see whole images: one mean and deviation for every pixel keeps the picture intact.
    if split.train.image.is_some() && linear_models::is_convolutional(&cfg.model) {
        let n = split.train.x.len().max(1) as f64;
        let mean = split.train.x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (split.train.x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt().max(1e-12);
        return Ok(split.map(|d| d.with_features(d.x.iter().map(|&v| ((v as f64 - mean) / std) as f32).collect(), d.features)));
    }
    let scaler = Standardizer::fit(&split.train);
    Ok(split.map(|d| scaler.apply(d)))
}

/// A batch's features and targets as tensors: x [n, features], labels u32 [n] or values f32 [n, 1].
fn features_and_targets(batch: &HostBatch) -> Result<(Tensor, Tensor), KilnError> {
    match <[Tensor; 2]>::try_from(batch.upload()?) {
        Ok([x, y]) => Ok((x, y)),
        Err(_) => Err(KilnError::Backward("a batch of rows has features and targets".into())),
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

/// Trains one model end to end and evaluates it on the test split.
pub fn run(cfg: &TrainConfig, mut progress: impl FnMut(&Progress)) -> Result<TrainReport, KilnError> {
    let started = Instant::now();
    // The thread's current device: the default one, or the device of an enclosing `Device::scope`.
    let g = Device::current()?;
    let degree = cfg.degree.unwrap_or(1);
    let raw_split = prepare(cfg, degree)?;
    let target_scale = TargetScale::fit(&raw_split.train);
    let split = match target_scale {
        Some(ts) => raw_split.map(|d| ts.apply(d)),
        None => raw_split.clone(),
    };
    let (mut s, opt_kind, schedule) = settings(cfg, split.train.len())?;
    if cfg.degree.is_some() && cfg.model != "polyreg" {
        return Err(KilnError::Backward("--degree applies to polyreg only".into()));
    }
    let mut vs = VarStore::new(cfg.seed);
    let arch = linear_models::Arch { hidden: &s.hidden, depth: cfg.depth.unwrap_or(20), seed: cfg.seed };
    let mut model = linear_models::build(&cfg.model, &mut vs, split.train.features, split.train.image, split.train.num_classes(), &arch)?;
    vs.finish()?;
    // LeNet on MNIST-10k defaults to small shifts, rotations and scalings ("none" turns them off).
    let augment = cfg.augment.or_else(|| (cfg.model == "lenet" && cfg.dataset == "mnist").then(|| kiln_graph::Augment { shift: 2, rotation: 10f32.to_radians(), scale: 0.1, ..Default::default() }));
    s.augment = augment.map(|a| format!("{a:?}")).unwrap_or_default();
    if augment.is_some_and(|a| !a.is_identity()) && !(linear_models::is_convolutional(&cfg.model) && split.train.image.is_some()) {
        return Err(KilnError::Backward("--augment needs a convolutional model on an image data set".into()));
    }
    let steps_per_epoch = split.train.len().div_ceil(s.batch_size) as u64;
    let total_steps = steps_per_epoch * s.epochs as u64;
    let mut opt = Optimizer::new(&vs, opt_kind, s.lr, s.weight_decay, schedule, total_steps)?;

    let mut loaded_from_checkpoint = Vec::new();
    if let Some(from) = &cfg.from {
        let ck = checkpoint::load(from).map_err(ck_err)?;
        // Transfer: every parameter whose name and shape match; a new head of another size starts fresh.
        let matching = |name: &str| ck.get(name).is_some_and(|t| vs.params().any(|p| p.name() == name && p.shape() == &t.shape[..]));
        loaded_from_checkpoint = vs.load_checkpoint(&from.display().to_string(), &ck, false, matching).map_err(ck_err)?;
        if loaded_from_checkpoint.is_empty() {
            return Err(KilnError::Backward(format!("{}: no parameter of this {} matches the checkpoint by name and shape", from.display(), cfg.model)));
        }
    }
    let frozen = if cfg.freeze.is_empty() { Vec::new() } else { opt.freeze(&vs, |name| cfg.freeze.iter().any(|p| name == p || name.starts_with(&format!("{p}.")))) };
    if !cfg.freeze.is_empty() && frozen.is_empty() {
        let names: Vec<&str> = vs.params().map(|p| p.name()).collect();
        return Err(KilnError::Backward(format!("--freeze {:?} matches no parameter; names are {}", cfg.freeze, names.join(", "))));
    }
    let mut start_epoch = 1;
    let (mut best_metric, mut best_epoch) = (f64::NEG_INFINITY, 0usize);
    if cfg.resume {
        let dir = cfg.out_dir.as_ref().ok_or_else(|| KilnError::Backward("--resume needs the run directory (--out)".into()))?;
        let (last, last_opt) = (dir.join("last.safetensors"), dir.join("last.optimizer.safetensors"));
        let ck = checkpoint::load(&last).map_err(ck_err)?;
        vs.load_checkpoint(&last.display().to_string(), &ck, true, |_| true).map_err(ck_err)?;
        let ock = checkpoint::load(&last_opt).map_err(ck_err)?;
        opt.load_state(&last_opt.display().to_string(), &ock).map_err(ck_err)?;
        model.net.set_rng_position(opt.steps_taken());
        let meta = |k: &str| ck.metadata.get(k).cloned().unwrap_or_default();
        if meta("kiln.model") != cfg.model {
            return Err(KilnError::Backward(format!("{} holds a {:?}, not a {}", last.display(), meta("kiln.model"), cfg.model)));
        }
        start_epoch = meta("kiln.epoch").parse::<usize>().map_err(|_| KilnError::Backward(format!("{}: no kiln.epoch in the metadata", last.display())))? + 1;
        best_metric = meta("kiln.best_dev_metric").parse().unwrap_or(f64::NEG_INFINITY);
        best_epoch = meta("kiln.best_epoch").parse().unwrap_or(0);
    }

    let classifier = split.train.num_classes().is_some();
    let mut csv = match &cfg.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| KilnError::Backward(format!("cannot create {}: {e}", dir.display())))?;
            let path = dir.join("metrics.csv");
            let appending = cfg.resume && path.exists();
            let mut f = std::fs::OpenOptions::new().create(true).append(appending).write(true).truncate(!appending).open(&path).map_err(|e| KilnError::Backward(format!("cannot write {}: {e}", path.display())))?;
            if !appending {
                let header = if classifier { "epoch,train_loss,train_accuracy,dev_loss,dev_accuracy,lr,seconds,samples_per_s" } else { "epoch,train_loss,dev_loss,dev_r2,lr,seconds,samples_per_s" };
                writeln!(f, "{header}").map_err(|e| KilnError::Backward(e.to_string()))?;
            }
            Some(f)
        }
        None => None,
    };
    let mut stopped_early = false;
    let mut best_checkpoint = None;
    let mut last_save = Instant::now();

    let mut history = Vec::new();
    let train_options = LoaderOptions { batch_size: s.batch_size, shuffle: Some(cfg.seed), drop_last: false, workers: 1, prefetch: 2 };
    let train_loader = DataLoader::shared(std::sync::Arc::new(split.train.clone()), StackRows::default(), train_options).map_err(data_err)?;
    let mut step = 0u64;
    // Steady state = every step after the first one of its batch size (a short last batch is a new shape).
    let (mut steady_submits, mut steady_steps, mut steady_buffers) = (0u64, 0u64, 0u64);
    let mut seen_batch_sizes = std::collections::HashSet::new();
    // Time inside training steps only (upload to loss readback): evaluation and checkpoints are not steps.
    let mut step_seconds = 0.0f64;
    let mut first_step_seconds: Option<f64> = None;
    let mut samples_seen = 0usize;
    for epoch in start_epoch..=s.epochs {
        let epoch_started = Instant::now();
        let mut loss_sum = 0.0;
        let mut correct_sum = 0.0;
        model.set_training(true);
        // Worker threads gather and collate the next batches while the GPU works on this one (the loader's
        // order is this loop's old one: seed * 1_000_003 + epoch).
        {
            // Step n's loss (and count of right answers) is read back while step n + 1 is recorded: the host
            // waits for it only after submitting the next step's work.
            let mut pending: Option<(kiln_graph::PendingValues, usize, bool, u64)> = None;
            let mut tally = |(read, n, with_correct, at_step): (kiln_graph::PendingValues, usize, bool, u64), samples_per_s: f64| -> Result<(), KilnError> {
                let values = read.wait()?;
                let (loss_value, right) = if with_correct { (values[0], values[1] as f64) } else { (values[0], 0.0) };
                if !loss_value.is_finite() {
                    return Err(KilnError::Backward(format!("loss became {loss_value} at step {at_step} (epoch {epoch}); try a smaller --lr")));
                }
                correct_sum += right;
                loss_sum += loss_value as f64 * n as f64;
                progress(&Progress { epoch, epochs: s.epochs, step: at_step, total_steps, loss: loss_value, samples_per_s, epoch_end: None });
                Ok(())
            };
            for batch in train_loader.epoch(epoch as u64) {
                let batch = batch.map_err(data_err)?;
                let n = batch.len();
                let before = kiln_graph::backend::thread_stats();
                let step_started = Instant::now();
                let (mut x, y) = features_and_targets(&batch)?;
                if let (Some(a), Some([c, h, w])) = (&augment, split.train.image) {
                    x = x.reshape(&[n, c, h, w])?.augment(a, cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(step))?;
                }
                let out = model.forward(&x)?;
                let loss = model.task.loss(&out, &y)?;
                let grads = loss.backward()?;
                opt.step(&vs, &grads)?;
                drop(grads);
                // Loss and the count of right answers come back in one readback (one submit per step).
                let correct = model.task.correct(&out, &y)?;
                let values = match &correct {
                    Some(c) => no_grad(|| Tensor::concat(&[&loss.reshape(&[1])?, &c.reshape(&[1])?], 0))?,
                    None => loss.clone(),
                };
                // This step is recorded, not yet submitted: take the last step's values (its readback buffer
                // returns to the pool and serves this one), then submit this step with its own readback.
                if let Some(previous) = pending.take() {
                    tally(previous, samples_seen as f64 / step_seconds.max(1e-9))?;
                }
                pending = Some((values.read_start()?, n, correct.is_some(), step + 1));
                step_seconds += step_started.elapsed().as_secs_f64();
                if first_step_seconds.is_none() {
                    first_step_seconds = Some(started.elapsed().as_secs_f64());
                }
                let after = kiln_graph::backend::thread_stats();
                if !seen_batch_sizes.insert(n) {
                    steady_submits += after.submits - before.submits;
                    steady_buffers += after.buffers_created - before.buffers_created;
                    steady_steps += 1;
                }
                step += 1;
                samples_seen += n;
            }
            if let Some(last) = pending.take() {
                tally(last, samples_seen as f64 / step_seconds.max(1e-9))?;
            }
        }
        model.set_training(false);
        let (dev_loss, dev_out) = evaluate(&model, &split.dev, target_scale)?;
        let record = EpochRecord {
            epoch,
            train_loss: TargetScale::loss(target_scale, loss_sum / split.train.len() as f64),
            train_accuracy: if classifier { correct_sum / split.train.len() as f64 } else { f64::NAN },
            dev_loss,
            dev_metric: quality(model.task, &dev_out, model.outputs, &raw_split.dev),
            lr: opt.current_lr(),
            seconds: started.elapsed().as_secs_f64(),
            samples_per_s: split.train.len() as f64 / epoch_started.elapsed().as_secs_f64().max(1e-9),
        };
        if let Some(f) = csv.as_mut() {
            let r = &record;
            let train_acc = if classifier { format!("{:.6},", r.train_accuracy) } else { String::new() };
            writeln!(f, "{},{:.6},{train_acc}{:.6},{:.6},{:.6e},{:.3},{:.1}", r.epoch, r.train_loss, r.dev_loss, r.dev_metric, r.lr, r.seconds, r.samples_per_s).map_err(|e| KilnError::Backward(e.to_string()))?;
        }
        progress(&Progress { epoch, epochs: s.epochs, step, total_steps, loss: record.train_loss as f32, samples_per_s: record.samples_per_s, epoch_end: Some(record.clone()) });
        let improved = record.dev_metric > best_metric;
        if improved {
            (best_metric, best_epoch) = (record.dev_metric, epoch);
        }
        history.push(record);
        let stop = cfg.patience.is_some_and(|p| epoch >= best_epoch + p);
        if let Some(dir) = &cfg.out_dir {
            // The best weights are kept on the host when they improve; files are written at most every few
            // seconds and at the end, so runs of many short epochs do not spend their time in fsync.
            if improved {
                let mut ck = vs.to_checkpoint()?;
                ck.metadata = run_metadata(cfg, &s, &split, epoch, best_metric, best_epoch);
                best_checkpoint = Some(ck);
            }
            if stop || epoch == s.epochs || last_save.elapsed().as_secs_f64() >= CHECKPOINT_EVERY_S {
                let mut ck = vs.to_checkpoint()?;
                ck.metadata = run_metadata(cfg, &s, &split, epoch, best_metric, best_epoch);
                checkpoint::save(&dir.join("last.safetensors"), &ck).map_err(ck_err)?;
                checkpoint::save(&dir.join("last.optimizer.safetensors"), &opt.state_checkpoint(&vs)?).map_err(ck_err)?;
                if let Some(best) = best_checkpoint.take() {
                    checkpoint::save(&dir.join("best.safetensors"), &best).map_err(ck_err)?;
                }
                let train: Vec<f64> = history.iter().map(|h| h.train_loss).collect();
                let dev: Vec<f64> = history.iter().map(|h| h.dev_loss).collect();
                crate::plot::loss_png(&dir.join("loss.png"), &train, &dev).map_err(|e| KilnError::Backward(format!("cannot write {}: {e}", dir.join("loss.png").display())))?;
                last_save = Instant::now();
            }
        }
        if stop {
            stopped_early = true;
            break;
        }
    }
    let end_stats = g.stats();

    let (test_loss, test_out) = evaluate(&model, &split.test, target_scale)?;
    let (train_eval_loss, _) = evaluate(&model, &split.train, target_scale)?;
    let mut report = TrainReport {
        model: cfg.model.clone(),
        dataset: split.train.name.clone(),
        adapter: g.adapter_name(),
        backend: g.backend(),
        epochs: s.epochs,
        steps: step,
        train_samples: split.train.len(),
        test_samples: split.test.len(),
        train_loss: train_eval_loss,
        dev_loss: history.last().map(|h| h.dev_loss).unwrap_or(f64::NAN),
        test_loss,
        test: TestMetrics::of(&model, &test_out, &raw_split.test.targets),
        normal_equation_cost: None,
        train_cost: None,
        seconds: started.elapsed().as_secs_f64(),
        samples_per_s: samples_seen as f64 / step_seconds.max(1e-9),
        ms_per_step: 1000.0 * step_seconds / step.max(1) as f64,
        seconds_to_first_step: first_step_seconds.unwrap_or(0.0),
        submits_per_step: if steady_steps > 0 { steady_submits as f64 / steady_steps as f64 } else { 1.0 },
        buffers_created_after_first_step: steady_buffers,
        peak_gpu_bytes: end_stats.peak_live_bytes,
        parameters: vs.num_values(),
        settings: s,
        history,
        best_dev_metric: best_metric,
        best_epoch,
        stopped_early,
        frozen,
        loaded_from_checkpoint,
    };
    if cfg.model == "linreg" {
        let train_y = raw_split.train.values().unwrap_or(&[]);
        report.normal_equation_cost = normal_equation(&raw_split.train.x, raw_split.train.features, train_y).map(|(_, c)| c);
        report.train_cost = Some(train_eval_loss / 2.0);
    }
    Ok(report)
}
