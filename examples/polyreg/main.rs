//! Polynomial regression on one real feature (body-mass index → diabetes progression), trained on a small
//! sample so that under- and over-fitting show: as the degree grows, the training cost falls while the dev
//! cost first falls, then rises.

use kiln_models::TrainConfig;

fn main() -> anyhow::Result<()> {
    println!("{:>6} {:>12} {:>12}", "degree", "train cost", "dev cost");
    for degree in [1, 2, 4, 8, 12] {
        let cfg = TrainConfig { degree: Some(degree), train_limit: Some(20), epochs: Some(3000), lr: Some(0.02), ..TrainConfig::new("polyreg", "diabetes") };
        let r = kiln_models::run(&cfg, |_| {})?;
        // Costs as J = MSE / 2, in the target's units.
        println!("{degree:>6} {:>12.1} {:>12.1}", r.train_loss / 2.0, r.dev_loss / 2.0);
    }
    Ok(())
}
