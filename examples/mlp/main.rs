//! A multi-layer perceptron (64 → 128 → ReLU → 10) on the real 8x8 handwritten digits, Adam, mini-batches of
//! 32, softmax cross-entropy.

use kiln_models::TrainConfig;

fn main() -> anyhow::Result<()> {
    let r = kiln_examples::train_verbose(&TrainConfig::new("mlp", "digits"), 5)?;
    println!("test accuracy {:.4} on {} held-out digits, macro F1 {:.4}", r.test.test_accuracy.unwrap_or(0.0), r.test_samples, r.test.test_macro_f1.unwrap_or(0.0));
    Ok(())
}
