//! The siamese embedding net (kiln_models::siamese): the verification and one-shot scoring on embeddings
//! whose answer is known, bad settings, and a short run on Fashion-MNIST whose loss falls.

use kiln_models::siamese::{pca_2d, train_siamese, verification_scores, MetricLoss, Representation, SiameseConfig};
use kiln_nn::metric_learning::Mining;
use kiln_tests::require_gpu;

#[test]
fn scores_of_embeddings_with_a_known_answer() {
    // Three classes at the corners of a triangle, a little spread: every pair and trial is right.
    let labels: Vec<u32> = (0..300).map(|i| [7, 8, 9][i % 3]).collect();
    let e: Vec<f32> = (0..300)
        .flat_map(|i| {
            let c = (i % 3) as f32;
            [c * 3.0 + 0.01 * (i as f32 * 0.37).sin(), (c - 1.0).abs() * 2.0 + 0.01 * (i as f32 * 0.11).cos()]
        })
        .collect();
    let dev: Vec<bool> = (0..300).map(|i| i % 2 == 0).collect();
    let cfg = SiameseConfig { pairs: 500, trials: 300, ..Default::default() };
    let s = verification_scores(&e, 2, &labels, &dev, &cfg).unwrap();
    assert_eq!((s.auc, s.test_accuracy, s.one_shot), (1.0, 1.0, 1.0), "{s:?}");
    // The lowest cut that keeps every same pair: the largest same-class distance, well below the classes' gap.
    assert!(s.threshold > 0.0 && s.threshold < 0.1, "{s:?}");
    // Embeddings that say nothing (all equal): AUC one half, one-shot at chance or below.
    let flat = vec![0.5f32; 600];
    let s = verification_scores(&flat, 2, &labels, &dev, &cfg).unwrap();
    assert_eq!(s.auc, 0.5, "{s:?}");
    // The PCA of points on a line is that line.
    let p = pca_2d(&[0.0, 0.0, 1.0, 2.0, 2.0, 4.0, 3.0, 6.0], 2);
    assert!(p.iter().all(|q| q.1.abs() < 1e-5) && (p[3].0 - p[0].0).abs() > 6.0, "{p:?}");
    let bad = SiameseConfig { ways: 4, ..cfg.clone() };
    assert!(verification_scores(&e, 2, &labels, &dev, &bad).unwrap_err().to_string().contains("4 ways"));
    // One class only: no different pairs exist, an error rather than an endless search.
    let one: Vec<u32> = vec![7; 300];
    let e = verification_scores(&flat, 2, &one, &dev, &cfg).unwrap_err().to_string();
    assert!(e.contains("two classes") && e.contains("1 classes"), "{e}");
}

#[test]
fn bad_settings_are_errors_and_a_short_run_lowers_the_loss() {
    require_gpu();
    let all = SiameseConfig { held_out: (0..9).collect(), steps: 1, ..Default::default() };
    let e = train_siamese(&all, |_, _| {}).err().expect("one class left to train on").to_string();
    assert!(e.contains("at least two"), "{e}");
    let one = SiameseConfig { held_out: vec![3], steps: 1, ..Default::default() };
    let e = train_siamese(&one, |_, _| {}).err().expect("one held-out class").to_string();
    assert!(e.contains("two held-out classes"), "{e}");
    // Batch-hard's loss is the mean over every anchor, so it falls as the net learns (batch-all's averages over
    // the triplets still active, which need not).
    let cfg = SiameseConfig { steps: 40, pairs: 400, trials: 200, loss: MetricLoss::Triplet(Mining::Hard), ..Default::default() };
    let (_, r, held) = train_siamese(&cfg, |_, _| {}).unwrap();
    eprintln!("{r:?}");
    assert!(r.last_loss < r.first_loss, "loss {} -> {}", r.first_loss, r.last_loss);
    assert_eq!(held.labels.len(), 3000, "the unseen classes' 3,000 test images");
    assert_eq!((r.representation, held.dim), ("embedding", cfg.dim));
    assert!((0.0..=1.0).contains(&r.trained.auc) && (0.0..=1.0).contains(&r.untrained.one_shot));
    // Scored on the trunk's features before the projection (a narrower trunk: 16 x 3 x 3 values per image),
    // each row of unit length.
    let features = SiameseConfig { steps: 2, eval_every: 1, representation: Representation::Features, channels: [8, 8, 16], ..cfg };
    let (net, r, held) = train_siamese(&features, |_, _| {}).unwrap();
    assert_eq!((r.representation, held.dim, net.feature_width()), ("features", 144, 144));
    for row in held.embeddings.chunks(held.dim).take(50) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "a feature row of norm {norm}");
    }
}
