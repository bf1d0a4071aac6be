//! Each example trains to its threshold on a reduced budget with a fixed seed; the same seed gives the same
//! losses; steps submit at most twice and allocate nothing once warm.

use kiln_models::{run, TrainConfig, TrainReport};
use kiln_tests::require_gpu;

fn train(cfg: TrainConfig) -> TrainReport {
    require_gpu();
    let name = format!("{} on {}", cfg.model, cfg.dataset);
    let r = run(&cfg, |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: acc {:?} r2 {:?} in {:.1} s, {:.2} ms/step", r.test.test_accuracy, r.test.test_r2, r.seconds, r.ms_per_step);
    r
}

#[test]
fn linreg_gradient_descent_reaches_the_normal_equation_cost() {
    let r = train(TrainConfig { epochs: Some(300), ..TrainConfig::new("linreg", "diabetes") });
    let (gd, ne) = (r.train_cost.unwrap(), r.normal_equation_cost.unwrap());
    assert!(gd <= ne * 1.01, "GD cost {gd} not within 1% of the normal equation's {ne}");
    assert!(gd >= ne * (1.0 - 1e-4), "GD cost {gd} below the least-squares optimum {ne}: one of them is wrong");
    assert!(r.test.test_r2.unwrap() > 0.4);
}

#[test]
fn polyreg_shows_over_fitting() {
    let fit = |degree| train(TrainConfig { degree: Some(degree), train_limit: Some(20), epochs: Some(1500), lr: Some(0.02), ..TrainConfig::new("polyreg", "diabetes") });
    let (low, high) = (fit(1), fit(12));
    assert!(high.train_loss < low.train_loss * 0.8, "degree 12 should fit the 20 training points better: {} vs {}", high.train_loss, low.train_loss);
    assert!(high.dev_loss > low.dev_loss, "degree 12 should generalise worse: dev {} vs {}", high.dev_loss, low.dev_loss);
}

#[test]
fn logreg_breast_cancer_reaches_94_percent() {
    let r = train(TrainConfig { epochs: Some(200), ..TrainConfig::new("logreg", "breast-cancer") });
    assert!(r.test.test_accuracy.unwrap() >= 0.94, "{:?}", r.test.test_accuracy);
}

#[test]
fn one_vs_all_on_iris_and_digits() {
    let iris = train(TrainConfig { epochs: Some(300), ..TrainConfig::new("logreg", "iris") });
    assert!(iris.test.test_accuracy.unwrap() >= 0.8, "iris {:?}", iris.test.test_accuracy);
    let digits = train(TrainConfig { epochs: Some(150), ..TrainConfig::new("logreg", "digits") });
    assert!(digits.test.test_accuracy.unwrap() >= 0.9, "digits {:?}", digits.test.test_accuracy);
    assert_eq!(digits.test.per_class.len(), 10);
}

#[test]
fn mlp_on_digits_reaches_95_percent_in_budget() {
    let r = train(TrainConfig { epochs: Some(12), ..TrainConfig::new("mlp", "digits") });
    assert!(r.test.test_accuracy.unwrap() >= 0.95, "{:?}", r.test.test_accuracy);
    assert!(r.submits_per_step.expect("measured") <= 2.0, "submits per step {:?}", r.submits_per_step);
    let cm_total: u64 = r.test.confusion.iter().flatten().sum();
    assert_eq!(cm_total as usize, r.test_samples);
}

#[test]
fn same_seed_same_losses() {
    let cfg = TrainConfig { epochs: Some(2), seed: 1234, ..TrainConfig::new("mlp", "digits") };
    let (a, b) = (train(cfg.clone()), train(cfg));
    let losses = |r: &TrainReport| r.history.iter().map(|h| (h.train_loss, h.dev_loss)).collect::<Vec<_>>();
    assert_eq!(losses(&a), losses(&b));
    let c = train(TrainConfig { epochs: Some(2), seed: 99, ..TrainConfig::new("mlp", "digits") });
    assert_ne!(losses(&a), losses(&c), "a different seed should change the run");
}

#[test]
fn optimizers_and_schedules_all_train() {
    for opt in ["gd", "sgd", "nesterov", "rmsprop", "adam", "adamw"] {
        let lr = if opt == "gd" {
            0.5
        } else if opt.starts_with("adam") || opt == "rmsprop" {
            0.01
        } else {
            0.1
        };
        let r = train(TrainConfig {
            epochs: Some(8),
            batch_size: Some(64),
            lr: Some(lr),
            weight_decay: Some(1e-4),
            optimizer: Some(opt.parse().unwrap()),
            schedule: Some("cosine+warmup:5".parse().unwrap()),
            ..TrainConfig::new("softmax", "digits")
        });
        assert!(r.test.test_accuracy.unwrap() > 0.85, "{opt}: {:?}", r.test.test_accuracy);
    }
}

#[test]
fn bad_settings_are_errors() {
    require_gpu();
    for cfg in [
        TrainConfig { epochs: Some(0), ..TrainConfig::new("mlp", "digits") },
        TrainConfig { batch_size: Some(0), ..TrainConfig::new("mlp", "digits") },
        TrainConfig { lr: Some(-1.0), ..TrainConfig::new("mlp", "digits") },
        TrainConfig::new("resnet9000", "digits"),
        TrainConfig::new("mlp", "imagenet"),
    ] {
        let e = run(&cfg, |_| {}).err().unwrap_or_else(|| panic!("{cfg:?} should fail"));
        assert!(!e.to_string().is_empty());
    }
}

/// LeNet on MNIST-10k with constant-rate Adam and no augmentation: the long, regularised defaults are for
/// full runs; short budgets learn faster without them.
fn plain_lenet_on_mnist() -> TrainConfig {
    TrainConfig {
        optimizer: Some("adam".parse().unwrap()),
        schedule: Some("constant".parse().unwrap()),
        weight_decay: Some(0.0),
        augment: Some("none".parse().unwrap()),
        ..TrainConfig::new("lenet", "mnist")
    }
}

#[test]
fn lenet_learns_mnist_on_a_reduced_budget() {
    // The full default run (README) reaches 98% on the MNIST-10k split; here 1,500 digits and 2 epochs without
    // the default augmentation must clear 85%.
    let r = train(TrainConfig { epochs: Some(2), train_limit: Some(1500), ..plain_lenet_on_mnist() });
    assert!(r.test.test_accuracy.unwrap() >= 0.85, "{:?}", r.test.test_accuracy);
    assert_eq!(r.parameters, 61_706);
}

#[test]
fn lenet_with_augmentation_trains() {
    let r = train(TrainConfig { epochs: Some(2), train_limit: Some(1000), augment: Some("shift:2,rotate:10".parse().unwrap()), ..plain_lenet_on_mnist() });
    assert!(r.test.test_accuracy.unwrap() >= 0.7, "{:?}", r.test.test_accuracy);
}

#[test]
fn lenet_on_fashion_mnist_and_transfer_to_mnist() {
    // The README's full runs: 89% on Fashion-MNIST after 10 epochs, and on MNIST-10k a head on frozen Fashion
    // features beats the same head on random frozen features (0.953 vs 0.937). Reduced: one epoch of the 60k
    // Fashion images must clear 80%; then, features frozen, a head trained for 2 epochs on 8,000 MNIST digits
    // must do better on the transferred features than on random ones. (Smaller budgets were tried: with
    // features from 20k Fashion images, or heads on a few hundred digits, random features do as well or better.)
    let dir = std::env::temp_dir().join(format!("kiln-transfer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fashion = train(TrainConfig { epochs: Some(1), out_dir: Some(dir.join("fashion")), ..TrainConfig::new("lenet", "fashion-mnist") });
    assert!(fashion.test.test_accuracy.unwrap() >= 0.80, "{:?}", fashion.test.test_accuracy);
    assert_eq!(fashion.test_samples, 10_000);
    let head = |from: Option<std::path::PathBuf>, tag: &str| {
        train(TrainConfig { epochs: Some(2), train_limit: Some(8000), from, freeze: vec!["features".into()], out_dir: Some(dir.join(tag)), ..plain_lenet_on_mnist() })
    };
    let transferred = head(Some(dir.join("fashion").join("best.safetensors")), "transfer");
    let random = head(None, "random");
    assert_eq!((transferred.frozen.len(), random.frozen.len()), (4, 4));
    let (t, r) = (transferred.test.test_accuracy.unwrap(), random.test.test_accuracy.unwrap());
    eprintln!("head on frozen features, 8,000 MNIST digits: transferred {t:.4}, random {r:.4}");
    assert!(t > r + 0.005, "transferred features {t:.4} should beat random ones {r:.4}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn early_stopping_on_a_flat_dev_metric() {
    // A learning rate too small to move the dev accuracy: the best epoch stays the first, so patience 2 stops
    // the run after epoch 3 of 50.
    let r = train(TrainConfig { epochs: Some(50), lr: Some(1e-12), patience: Some(2), ..TrainConfig::new("logreg", "iris") });
    assert!(r.stopped_early);
    assert_eq!((r.best_epoch, r.history.len()), (1, 3));
    // Train accuracy is reported per epoch for classifiers.
    assert!(r.history.iter().all(|h| (0.0..=1.0).contains(&h.train_accuracy)));
}
