//! Classification with localisation (kiln_models::localize): the course's target vector, both losses against
//! their formulas written out here, and a reduced training run that must find the objects.

use kiln_models::localize::{decode_box, encode_target, train_localizer, LocalizationLoss, LocalizeConfig, Localizer};
use kiln_nn::VarStore;
use kiln_tests::{require_gpu, test_rng};

#[test]
fn the_target_vector_is_the_courses() {
    // An object (10, 20)-(30, 60) of class 2 in a 100-pixel image: centre (0.2, 0.4), height 0.4, width 0.2.
    let y = encode_target(Some(([10.0, 20.0, 30.0, 60.0], 2)), 100, 3);
    let want = [1.0, 0.2, 0.4, 0.4, 0.2, 0.0, 0.0, 1.0];
    assert!(y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{y:?}");
    assert_eq!(encode_target(None, 100, 3), vec![0.0; 8]);
    let b = decode_box([y[1], y[2], y[3], y[4]], 100);
    assert!(b.iter().zip([10.0, 20.0, 30.0, 60.0]).all(|(a, w)| (a - w).abs() < 1e-4), "{b:?}");
}

#[test]
fn both_losses_equal_their_formulas() {
    require_gpu();
    let mut rng = test_rng("localize_loss");
    let (n, classes) = (5, 3);
    let k = 5 + classes;
    for kind in [LocalizationLoss::Squared, LocalizationLoss::Mixed] {
        let mut vs = VarStore::new(1);
        let model = Localizer::new(&mut vs, 16, classes, 2, kind).unwrap();
        vs.finish().unwrap();
        let out: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        // Images 0 and 3 are empty.
        let y: Vec<f32> = (0..n)
            .flat_map(|i| {
                let object =
                    (i != 0 && i != 3).then(|| ([rng.range(0.0, 6.0) as f32, rng.range(0.0, 6.0) as f32, rng.range(8.0, 16.0) as f32, rng.range(8.0, 16.0) as f32], rng.below(classes) as u32));
                encode_target(object, 16, classes)
            })
            .collect();
        let got = model.loss(&kiln_graph::Tensor::from_slice(&out, &[n, k]).unwrap(), &y).unwrap().to_scalar().unwrap() as f64;
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let mut want = 0.0;
        let objects = (0..n).filter(|&i| y[i * k] == 1.0).count() as f64;
        for i in 0..n {
            let (o, t) = (&out[i * k..(i + 1) * k], &y[i * k..(i + 1) * k]);
            let present = t[0] == 1.0;
            match kind {
                LocalizationLoss::Squared => {
                    // Course: all 5 + K squared errors with an object, the first alone without.
                    let terms = if present { k } else { 1 };
                    want += (0..terms).map(|j| (o[j] as f64 - t[j] as f64).powi(2)).sum::<f64>() / n as f64;
                }
                LocalizationLoss::Mixed => {
                    let p = sig(o[0] as f64);
                    want -= (t[0] as f64 * p.ln() + (1.0 - t[0] as f64) * (1.0 - p).ln()) / n as f64;
                    if present {
                        want += 5.0 * (1..5).map(|j| (sig(o[j] as f64) - t[j] as f64).powi(2)).sum::<f64>() / objects;
                        let lse = (5..k).map(|j| (o[j] as f64).exp()).sum::<f64>().ln();
                        let label = (5..k).find(|&j| t[j] == 1.0).unwrap();
                        want += (lse - o[label] as f64) / objects;
                    }
                }
            }
        }
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{kind:?}: {got} against {want}");
    }
    // Bad input: a target of the wrong length names both shapes.
    let mut vs = VarStore::new(1);
    let model = Localizer::new(&mut vs, 16, classes, 2, LocalizationLoss::Mixed).unwrap();
    vs.finish().unwrap();
    let e = model.loss(&kiln_graph::Tensor::zeros(&[2, k]).unwrap(), &[0.0; 7]).unwrap_err().to_string();
    assert!(e.contains("[2, 8]") && e.contains("5 + 3"), "{e}");
    assert!(Localizer::new(&mut VarStore::new(1), 20, classes, 2, LocalizationLoss::Mixed).is_err(), "a side that is not a multiple of 16");
}

#[test]
fn a_short_run_finds_the_objects() {
    require_gpu();
    // Digits only, 48-pixel scenes, 250 steps: far from the default's figures, far above chance.
    let d = LocalizeConfig::default();
    let cfg = LocalizeConfig {
        scenes: kiln_data::ObjectSceneConfig { size: 48, scale: (0.75, 1.5), source: kiln_data::ObjectSource::Digits, ..d.scenes },
        steps: 250,
        batch_size: 16,
        lr: 2e-3,
        test_scenes: 200,
        ..d
    };
    let (_, r) = train_localizer(&cfg, |_, _| {}).unwrap();
    eprintln!("{r:?}");
    assert!(r.last_loss < 0.6 * r.first_loss, "{r:?}");
    assert!(r.presence_accuracy > 0.9, "{r:?}");
    // Chance is 0.1 for the class (ten digits).
    assert!(r.mean_iou > 0.4 && r.class_accuracy > 0.18, "{r:?}");
}
