//! LeNet-5 on real images: `cargo run --release --example lenet -- [fashion-mnist|mnist] [EPOCHS]`.
//! Writes runs/lenet-<data set>/ (metrics.csv, loss.png, last and best checkpoints).

use kiln_models::TrainConfig;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dataset = args.next().unwrap_or_else(|| "fashion-mnist".into());
    let epochs = args.next().map(|e| e.parse::<usize>()).transpose()?;
    let cfg = TrainConfig { epochs, out_dir: Some(format!("runs/lenet-{dataset}").into()), ..TrainConfig::new("lenet", &dataset) };
    let r = kiln_examples::train_verbose(&cfg, 1)?;
    println!("test accuracy {:.4} on {} images; best dev {:.4} at epoch {}; run directory runs/lenet-{dataset}", r.test.test_accuracy.unwrap_or(0.0), r.test_samples, r.best_dev_metric, r.best_epoch);
    Ok(())
}
