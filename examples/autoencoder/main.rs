//! Autoencoders on MNIST-10k (kiln_models::autoencoder): MLP and convolutional, plain and denoising; the test
//! reconstruction error, and PNGs of test inputs beside their reconstructions in runs/autoencoder-example.
//! `cargo run --release --example autoencoder [-- STEPS [mnist|fashion-mnist]]`
use kiln_models::autoencoder::{train_autoencoder, AeConfig, AeKind};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let dataset = args.next().unwrap_or_else(|| "mnist".into());
    let out = std::path::Path::new("runs/autoencoder-example");
    std::fs::create_dir_all(out)?;
    for (kind, noise) in [(AeKind::Mlp, 0.0), (AeKind::Conv, 0.0), (AeKind::Conv, 0.5)] {
        let cfg = AeConfig { dataset: dataset.clone(), kind, noise, steps, ..Default::default() };
        let (_, r, [input, output, clean]) = train_autoencoder(&cfg, |_, _| {})?;
        let name = format!("{}{}", if kind == AeKind::Mlp { "mlp" } else { "conv" }, if noise > 0.0 { "-denoising" } else { "" });
        println!(
            "{name:<15} {} steps ({:.0} ms/step, {} parameters): test BCE {:.4}, MSE {:.4} (the inputs' own MSE {:.4})",
            r.steps, r.ms_per_step, r.parameters, r.test_bce, r.test_mse, r.input_mse
        );
        // Rows of 8: the inputs, the reconstructions, and for a denoiser the clean images.
        let mut grid = input.clone();
        grid.extend(&output);
        if noise > 0.0 {
            grid.extend(&clean);
        }
        let path = out.join(format!("{name}.png"));
        kiln_models::plot::image_grid_png(&path, &grid, 28, 8, 2)?;
        println!("  picture {}", path.display());
    }
    Ok(())
}
