//! Siamese embeddings with the triplet loss on Fashion-MNIST (kiln_models::siamese): trained on seven
//! classes, scored on the three it never saw (verification ROC AUC, a threshold chosen on a dev half, 3-way
//! one-shot accuracy), beside the untrained network; a PCA of the unseen classes' embeddings in
//! runs/siamese-example/embeddings.png.
//! `cargo run --release --example siamese [-- STEPS [all|hard|semi-hard|contrastive [HELD,OUT,CLASSES [DIM [MARGIN]]]]]`
use kiln_models::siamese::{pca_2d, train_siamese, MetricLoss, SiameseConfig};
use kiln_nn::metric_learning::Mining;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(300);
    let (loss, margin) = match args.next().as_deref() {
        Some("semi-hard") => (MetricLoss::Triplet(Mining::SemiHard), 0.2),
        Some("hard") => (MetricLoss::Triplet(Mining::Hard), 0.2),
        Some("contrastive") => (MetricLoss::Contrastive, 1.0),
        _ => (MetricLoss::Triplet(Mining::All), 0.2),
    };
    let d = SiameseConfig::default();
    let held_out = args.next().map(|s| s.split(',').filter_map(|c| c.parse().ok()).collect()).unwrap_or(d.held_out);
    let dim = args.next().and_then(|s| s.parse().ok()).unwrap_or(d.dim);
    let margin = args.next().and_then(|s| s.parse().ok()).unwrap_or(margin);
    let cfg = SiameseConfig { steps, loss, margin, held_out, dim, ..d };
    let (_, r, held) = train_siamese(&cfg, |step, loss| {
        if step % 100 == 0 {
            eprintln!("step {step}: loss {loss:.4}");
        }
    })?;
    println!("siamese net, {} loss (margin {margin}), {} steps of 7 x {} ({:.0} ms/step), {} parameters", r.loss, r.steps, cfg.per_class, r.ms_per_step, r.parameters);
    println!("  loss {:.4} -> {:.4}; weights kept from step {} (dev-half AUC {:.3})", r.first_loss, r.last_loss, r.best_step, r.best_dev_auc);
    for (name, s) in [("trained", &r.trained), ("untrained", &r.untrained)] {
        println!(
            "  {name:<9} unseen classes {:?}: ROC AUC {:.3}; threshold {:.3} (dev accuracy {:.3}), test accuracy {:.3}; {}-way one-shot {:.3}",
            r.held_out, s.auc, s.threshold, s.dev_accuracy, s.test_accuracy, r.ways, s.one_shot
        );
    }
    let out = std::path::Path::new("runs/siamese-example");
    std::fs::create_dir_all(out)?;
    kiln_models::plot::scatter_png(&out.join("embeddings.png"), &pca_2d(&held.embeddings, held.dim), &held.labels)?;
    println!("  picture {}", out.join("embeddings.png").display());
    Ok(())
}
