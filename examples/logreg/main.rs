//! Logistic regression: binary on the breast-cancer data (malignant vs benign, threshold 0.5), then
//! one-vs-all on iris and on the 8x8 digits (K binary classifiers, predict the most confident).

use kiln_models::TrainConfig;

fn main() -> anyhow::Result<()> {
    for dataset in ["breast-cancer", "iris", "digits"] {
        println!("== logistic regression on {dataset}");
        let r = kiln_examples::train_verbose(&TrainConfig::new("logreg", dataset), 100)?;
        println!("test accuracy {:.4}, macro F1 {:.4}\n", r.test.test_accuracy.unwrap_or(0.0), r.test.test_macro_f1.unwrap_or(0.0));
    }
    Ok(())
}
