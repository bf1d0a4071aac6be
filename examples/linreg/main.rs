//! Linear regression on the diabetes data by batch gradient descent, checked against the normal equation.
//!
//! J(θ) = 1/(2m) Σ (θᵀx − y)²; gradient descent on standardised features should reach the cost of the exact
//! least-squares solution (X^T X)θ = X^T y, solved here on the host in f64.

use kiln_models::TrainConfig;

fn main() -> anyhow::Result<()> {
    let cfg = TrainConfig { epochs: Some(500), ..TrainConfig::new("linreg", "diabetes") };
    let r = kiln_examples::train_verbose(&cfg, 50)?;
    let (gd, ne) = (r.train_cost.unwrap_or(f64::NAN), r.normal_equation_cost.unwrap_or(f64::NAN));
    println!("training cost J(θ): gradient descent {gd:.3}, normal equation {ne:.3} — GD is {:.3}% above", 100.0 * (gd / ne - 1.0));
    println!("test MSE {:.1}, test R² {:.3}", r.test.test_mse.unwrap_or(f64::NAN), r.test.test_r2.unwrap_or(f64::NAN));
    if gd > ne * 1.01 {
        anyhow::bail!("gradient descent did not reach the normal-equation cost within 1%");
    }
    Ok(())
}
