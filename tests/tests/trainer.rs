//! The reusable training loop (kiln_models::Trainer) with a step function of the user's own: progress per
//! step, values read back a step behind, early stopping, metrics.csv, the epoch-end state callbacks see.

use std::cell::RefCell;

use kiln_data::{ArrayDataset, DataLoader, LoaderOptions, StackRows, Targets};
use kiln_graph::{loss, Tensor};
use kiln_models::{Callback, EarlyStopping, EpochEnd, EpochRecord, MetricsCsv, OnProgress, StepValues, Trainer};
use kiln_nn::schedule::Schedule;
use kiln_nn::{Init, Layer, Linear, Optimizer, OptimizerKind, VarStore};
use kiln_tests::require_gpu;

/// y = 2 x0 - x1 + 0.5 on 64 points.
fn line() -> ArrayDataset {
    let x: Vec<f32> = (0..128).map(|i| ((i * 37) % 64) as f32 / 32.0 - 1.0).collect();
    let y = (0..64).map(|i| 2.0 * x[2 * i] - x[2 * i + 1] + 0.5).collect();
    ArrayDataset { name: "line".into(), x, features: 2, targets: Targets::Values(y), image: None }
}

/// Records what the loop told it: (epoch, improved, last) per epoch end.
#[derive(Default)]
struct Seen {
    epochs: Vec<(usize, bool, bool)>,
}

struct Watch<'a>(&'a RefCell<Seen>);

impl Callback for Watch<'_> {
    fn on_epoch_end(&mut self, end: &EpochEnd) -> kiln_graph::Result<()> {
        assert_eq!(end.history.last().map(|r| r.epoch), Some(end.record.epoch), "history ends with this epoch");
        self.0.borrow_mut().epochs.push((end.record.epoch, end.improved, end.last));
        Ok(())
    }
}

#[test]
fn a_user_step_trains_through_the_loop_with_callbacks() {
    require_gpu();
    let mut vs = VarStore::new(1);
    let net = Linear::new(&mut vs, "fc", 2, 1, Init::Zeros).unwrap();
    vs.finish().unwrap();
    let opt = RefCell::new(Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 0.05, 0.0, Schedule::constant(), 1000).unwrap());
    let loader = DataLoader::new(line(), StackRows::default(), LoaderOptions { batch_size: 16, shuffle: Some(3), workers: 2, ..Default::default() }).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-trainer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let seen = RefCell::new(Seen::default());
    let mut steps_reported = Vec::new();
    let epoch_losses = RefCell::new(Vec::new());
    {
        let mut trainer = Trainer::new(6, 24)
            .callback(OnProgress(|p: &kiln_models::Progress| {
                if p.epoch_end.is_none() {
                    steps_reported.push(p.step);
                }
            }))
            .callback(MetricsCsv::open(dir.join("metrics.csv"), false, "dev_r2", None).unwrap())
            .callback(Watch(&seen));
        let step = |batch: &kiln_data::HostBatch, _: u64| {
            let t = batch.upload()?;
            let loss = loss::mse_loss(&net.forward(&t[0])?, &t[1])?;
            opt.borrow_mut().step(&vs, &loss.backward()?)?;
            Ok(StepValues { loss, correct: None })
        };
        let evaluate = |t: kiln_models::EpochTally| {
            let mean = t.loss_sum / t.samples as f64;
            epoch_losses.borrow_mut().push(mean);
            Ok(EpochRecord { epoch: t.epoch, train_loss: mean, train_accuracy: f64::NAN, dev_loss: mean, dev_metric: -mean, lr: 0.05, seconds: 0.0, samples_per_s: 0.0 })
        };
        let fit = trainer.fit(&loader, step, evaluate).unwrap();
        assert_eq!((fit.steps, fit.samples_seen, fit.history.len(), fit.stopped_early), (24, 384, 6, false));
    }
    // Every step's loss came back (a step behind), numbered 1..=24.
    assert_eq!(steps_reported, (1..=24).collect::<Vec<u64>>());
    let losses = epoch_losses.into_inner();
    assert!(losses[5] < 0.2 * losses[0], "the line is being fitted: {losses:?}");
    assert_eq!(seen.borrow().epochs.last(), Some(&(6, true, true)));
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    assert!(csv.starts_with("epoch,train_loss,dev_loss,dev_r2,lr,seconds,samples_per_s"), "{csv}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn early_stopping_ends_the_run_after_patience_epochs_without_improvement() {
    require_gpu();
    let loader = DataLoader::new(line(), StackRows::default(), LoaderOptions { batch_size: 64, ..Default::default() }).unwrap();
    let seen = RefCell::new(Seen::default());
    let mut trainer = Trainer::new(20, 20).callback(EarlyStopping { patience: 3 }).callback(Watch(&seen));
    // The dev metric improves for two epochs, then stays flat.
    let metric = [0.1, 0.5, 0.5, 0.4, 0.5, 0.5, 0.5];
    let step = |_: &kiln_data::HostBatch, _: u64| Ok(StepValues { loss: Tensor::scalar(1.0)?, correct: None });
    let evaluate = |t: kiln_models::EpochTally| {
        Ok(EpochRecord { epoch: t.epoch, train_loss: 1.0, train_accuracy: f64::NAN, dev_loss: 1.0, dev_metric: metric[t.epoch - 1], lr: 0.0, seconds: 0.0, samples_per_s: 0.0 })
    };
    let fit = trainer.fit(&loader, step, evaluate).unwrap();
    assert!(fit.stopped_early);
    assert_eq!((fit.best_epoch, fit.history.len()), (2, 5));
    assert_eq!(seen.borrow().epochs, [(1, true, false), (2, true, false), (3, false, false), (4, false, false), (5, false, true)]);
}

#[test]
fn a_non_finite_loss_stops_the_loop_with_an_error_naming_the_step() {
    require_gpu();
    let loader = DataLoader::new(line(), StackRows::default(), LoaderOptions { batch_size: 8, ..Default::default() }).unwrap();
    let mut trainer = Trainer::new(1, 8);
    let step = |_: &kiln_data::HostBatch, i: u64| Ok(StepValues { loss: Tensor::scalar(if i == 3 { f32::NAN } else { 1.0 })?, correct: None });
    let evaluate = |_| unreachable!("the epoch fails before its evaluation");
    let err = trainer.fit(&loader, step, evaluate).expect_err("an error").to_string();
    assert!(err.contains("step 4") && err.contains("NaN"), "{err}");
}
