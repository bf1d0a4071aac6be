//! The siamese embedding net (kiln_models::siamese): the verification and one-shot scoring on embeddings
//! whose answer is known, bad settings, and a short run on Fashion-MNIST whose loss falls.

use kiln_models::siamese::{embed, pca_2d, train_siamese, verification_scores, EmbeddingNet, MetricLoss, Representation, SiameseConfig, Trunk};
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
    let features = SiameseConfig { steps: 2, eval_every: 1, representation: Representation::Features, trunk: Trunk { channels: [8, 8, 16], ..Trunk::SMALL }, ..cfg };
    let (net, r, held) = train_siamese(&features, |_, _| {}).unwrap();
    assert_eq!((r.representation, held.dim, net.feature_width()), ("features", 144, 144));
    for row in held.embeddings.chunks(held.dim).take(50) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "a feature row of norm {norm}");
    }
}

/// The deeper trunk with batch norm: PyTorch-style names, running statistics moved by training steps, and
/// embeddings (evaluation mode, the running statistics) that do not depend on the other images of the batch;
/// in training mode they do (the batch's statistics).
#[test]
fn the_batch_norm_trunk_trains_with_batch_statistics_and_embeds_with_running_ones() {
    require_gpu();
    let mut vs = kiln_nn::VarStore::new(3);
    let trunk = Trunk { channels: [4, 8, 8], ..Trunk::DEEP_BN };
    let net = EmbeddingNet::with_trunk(&mut vs, trunk, 16).unwrap();
    vs.finish().unwrap();
    let names: Vec<&str> = vs.params().map(|p| p.name()).collect();
    for want in ["features.5.weight", "norms.0.running_mean", "norms.5.weight", "embedding.weight"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(EmbeddingNet::with_trunk(&mut kiln_nn::VarStore::new(1), Trunk { convs_per_stage: 0, ..trunk }, 16).is_err());
    let cfg = SiameseConfig { steps: 3, eval_every: 0, pairs: 200, trials: 100, trunk, dim: 16, adapt_batch_norm: true, ..Default::default() };
    let (mut net_trained, r, held) = train_siamese(&cfg, |_, _| {}).unwrap();
    assert!(r.trained.auc.is_finite() && held.dim == 16);
    let mean = net_trained.norms[0].running_mean.tensor().unwrap().to_vec().unwrap();
    assert!(mean.iter().any(|v| v.abs() > 1e-4), "three steps moved the running mean: {mean:?}");
    // Evaluation mode (what train_siamese hands back): one image alone embeds as it does among others.
    let mut rng = kiln_graph::Rng::new(9);
    let images: Vec<f32> = (0..5 * 784).map(|_| rng.uniform() as f32).collect();
    let batch = embed(&net_trained, &images, Representation::Embedding).unwrap();
    let alone = embed(&net_trained, &images[..784], Representation::Embedding).unwrap();
    kiln_tests::assert_close("an image alone and in a batch", &alone, &batch[..16].iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-5);
    use kiln_nn::Module;
    net_trained.set_training(true);
    let batch = kiln_graph::no_grad(|| net_trained.forward(&kiln_graph::Tensor::from_slice(&images, &[5, 1, 28, 28])?)).unwrap().to_vec().unwrap();
    let pair = kiln_graph::no_grad(|| net_trained.forward(&kiln_graph::Tensor::from_slice(&images[..2 * 784], &[2, 1, 28, 28])?)).unwrap().to_vec().unwrap();
    assert!(batch[..16].iter().zip(&pair[..16]).any(|(a, b)| (a - b).abs() > 1e-4), "training mode normalises with the batch's statistics");
    drop(net);
    // AdaBN on 300 images (batches of 256 and 44): the first norm's running mean becomes the mean of the two
    // batches' channel means weighted equally, and the net is left in evaluation mode.
    let images: Vec<f32> = (0..300 * 784).map(|_| rng.uniform() as f32).collect();
    kiln_models::siamese::adapt_batch_norm(&mut net_trained, &images).unwrap();
    assert!(!net_trained.norms[0].training);
    use kiln_nn::Layer;
    let channel_means = |from: usize, to: usize| -> Vec<f64> {
        let x = kiln_graph::Tensor::from_slice(&images[from * 784..to * 784], &[to - from, 1, 28, 28]).unwrap();
        let y = net_trained.convs[0].forward(&x).unwrap().to_vec().unwrap();
        (0..4).map(|c| (0..to - from).flat_map(|i| y[(i * 4 + c) * 784..(i * 4 + c + 1) * 784].iter()).map(|&v| v as f64).sum::<f64>() / ((to - from) * 784) as f64).collect()
    };
    let (first, second) = (channel_means(0, 256), channel_means(256, 300));
    let want: Vec<f64> = first.iter().zip(&second).map(|(a, b)| (a + b) / 2.0).collect();
    kiln_tests::assert_close("AdaBN's running mean", &net_trained.norms[0].running_mean.tensor().unwrap().to_vec().unwrap(), &want, 1e-4);
}
