//! DCGAN on Fashion-MNIST (kiln_models::gan): a fixed-noise sample grid PNG after every epoch in
//! runs/dcgan-example, and a number for "it works": the Frechet distance of 10,000 samples to the 10,000 real
//! test images on the features of a classifier Kiln trains on the same data (NOT the Inception FID), after
//! each epoch, beside the distance of a mixture of only ten real images (what mode collapse looks like), the
//! classes the classifier gives the samples, and a PNG of samples beside their nearest training images.
//! `cargo run --release --example dcgan [-- EPOCHS [fashion-mnist|mnist [standard|minimax|wgan-gp]]]`
use kiln_models::frechet::{nearest_images, score_samples, train_feature_net};
use kiln_models::gan::{gan_images, generate, train_dcgan, DcganConfig, GanObjective, GeneratorLoss};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let epochs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dataset = args.next().unwrap_or_else(|| "fashion-mnist".into());
    let objective = match args.next().as_deref() {
        Some("minimax") => GanObjective::Standard(GeneratorLoss::Minimax),
        Some("wgan-gp") => GanObjective::WganGp { lambda: 10.0, n_critic: 5 },
        _ => GanObjective::Standard(GeneratorLoss::NonSaturating),
    };
    let lr = if matches!(objective, GanObjective::WganGp { .. }) { 1e-4 } else { 2e-4 };
    let cfg = DcganConfig { dataset: dataset.clone(), objective, epochs, lr, ..Default::default() };
    let out = std::path::Path::new("runs/dcgan-example");
    std::fs::create_dir_all(out)?;

    // The classifier whose features the distance uses, trained on the same data set.
    let split = kiln_data::load_split(&dataset, None, cfg.seed)?;
    let labels = |s: &kiln_data::ArrayDataset| match &s.targets {
        kiln_data::Targets::Classes { labels, .. } => labels.clone(),
        _ => Vec::new(),
    };
    let (train_y, test_y) = (labels(&split.train), labels(&split.test));
    let (classifier, accuracy) = train_feature_net((&split.train.x, &train_y), (&split.test.x, &test_y), 1500, cfg.seed)?;
    let real = &split.test.x;
    let (real_features, _) = classifier.describe_images(real)?;
    println!("feature classifier: {:.1}% test accuracy on {dataset}", 100.0 * accuracy);
    let few: Vec<f32> = (0..10_000).flat_map(|i| real[(i % 10) * 784..(i % 10 + 1) * 784].iter().copied()).collect();
    let collapse = score_samples(&classifier, &few, &real_features)?;
    println!("a mixture of 10 real test images: Frechet distance {:.2}", collapse.frechet);

    let mut per_epoch = Vec::new();
    let (generator, _, epochs_run) = train_dcgan(
        &cfg,
        |step, d, g| {
            if step % 200 == 0 {
                eprintln!("step {step}: D loss {d:.3}, G loss {g:.3}");
            }
        },
        |epoch, g| {
            let grid = generate(g, 64, 7)?;
            kiln_models::plot::image_grid_png(&out.join(format!("epoch-{epoch}.png")), &grid, 28, 8, 2).map_err(|e| kiln_graph::KilnError::Data(e.to_string()))?;
            let s = score_samples(&classifier, &generate(g, 10_000, 11)?, &real_features)?;
            eprintln!("epoch {epoch}: Frechet distance {:.2}", s.frechet);
            per_epoch.push(s);
            Ok(())
        },
    )?;
    println!("DCGAN ({objective:?}) on {dataset}, {} epochs of batch {}:", cfg.epochs, cfg.batch_size);
    for (e, s) in epochs_run.iter().zip(&per_epoch) {
        let (classes, top) = s.spread();
        println!(
            "  epoch {}: D loss {:.3}, G loss {:.3}, {:.0} s; Frechet distance {:.2}; samples in {classes} classes, the largest {:.1}%",
            e.epoch,
            e.d_loss,
            e.g_loss,
            e.seconds,
            s.frechet,
            100.0 * top
        );
    }
    // Samples beside their nearest training images (pixel distance).
    let samples = generate(&generator, 8, 13)?;
    let train01: Vec<f32> = gan_images(&dataset, None, cfg.seed)?.into_iter().map(|v| 0.5 * (v + 1.0)).collect();
    let mut pairs = Vec::new();
    for (k, nearest) in nearest_images(&samples, &train01).into_iter().enumerate() {
        pairs.extend_from_slice(&samples[k * 784..(k + 1) * 784]);
        pairs.extend_from_slice(&train01[nearest * 784..(nearest + 1) * 784]);
    }
    kiln_models::plot::image_grid_png(&out.join("nearest.png"), &pairs, 28, 2, 3)?;
    println!("  pictures: {}/epoch-N.png, {}/nearest.png (each sample, then its nearest training image)", out.display(), out.display());
    Ok(())
}
