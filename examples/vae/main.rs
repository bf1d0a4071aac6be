//! A variational autoencoder on binarised MNIST-10k (kiln_models::vae): the test ELBO in nats per image and
//! an importance-weighted log p(x) (k = 100); sample, interpolation and (2-D latent) manifold PNGs in
//! runs/vae-example.
//! `cargo run --release --example vae [-- STEPS [LATENT [bernoulli|gaussian [BETA]]]]`
use kiln_models::vae::{train_vae, vae_data, vae_pictures, Likelihood, VaeConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let d = VaeConfig::default();
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(d.steps);
    let latent: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(d.latent);
    let likelihood = if args.next().as_deref() == Some("gaussian") { Likelihood::Gaussian } else { Likelihood::Bernoulli };
    let beta: f32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let cfg = VaeConfig { steps, latent, likelihood, beta, ..d };
    let (model, r) = train_vae(&cfg, |step, loss| {
        if step % 500 == 0 {
            eprintln!("step {step}: loss {loss:.2}");
        }
    })?;
    println!("VAE, {latent}-d latent, {likelihood:?} decoder, beta {beta}: {} steps of {} ({:.1} ms/step), {} parameters", r.steps, cfg.batch_size, r.ms_per_step, r.parameters);
    println!("  loss {:.2} -> {:.2}", r.first_loss, r.last_loss);
    println!(
        "  {} test digits ({}): ELBO {:.2} nats/image (log-likelihood {:.2}, KL {:.2}); log p(x) >= {:.2} (k = {})",
        r.test_images, r.test_data, r.test_elbo, r.test_log_likelihood, r.test_kl, r.test_log_px, r.iw_samples
    );
    let test = vae_data(cfg.seed, None)?.1;
    for p in vae_pictures(&model, &test, cfg.seed, std::path::Path::new("runs/vae-example"))? {
        println!("  picture {}", p.display());
    }
    Ok(())
}
