//! A hand-written training loop with two optimizers: a GAN learns to draw samples of N(3, 0.5^2) from noise.
//! The discriminator and the generator live in two VarStores, each with its own Adam; each step trains the
//! discriminator on real and (detached) generated samples, then the generator through the discriminator.
//! `cargo run --release --example custom_loop`
use kiln::prelude::*;

const MEAN: f32 = 3.0;
const STD: f32 = 0.5;
const BATCH: usize = 128;

fn normal(rng: &mut Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n).map(|_| mean + std * rng.normal() as f32).collect()
}

fn mlp(vs: &mut VarStore, name: &str, inputs: usize, act: Activation) -> kiln::graph::Result<Sequential> {
    Ok(Sequential::new().push(Linear::new(vs, &format!("{name}.0"), inputs, 32, Init::HeNormal)?).push(act).push(Linear::new(vs, &format!("{name}.2"), 32, 1, Init::XavierUniform)?))
}

/// Trains for `steps` and returns the mean and standard deviation of 2,000 generated samples.
pub fn train(steps: u64, seed: u64) -> kiln::graph::Result<(f32, f32)> {
    let mut rng = Rng::new(seed);
    let (mut vs_g, mut vs_d) = (VarStore::new(seed), VarStore::new(seed + 1));
    let generator = mlp(&mut vs_g, "generator", 4, Activation::Tanh)?;
    let critic = mlp(&mut vs_d, "discriminator", 1, Activation::LeakyRelu(0.2))?;
    vs_g.finish()?;
    vs_d.finish()?;
    let adam = OptimizerKind::Adam { beta1: 0.5, beta2: 0.999, eps: 1e-8 };
    let mut opt_g = Optimizer::new(&vs_g, adam, 2e-3, 0.0, Schedule::constant(), steps)?;
    let mut opt_d = Optimizer::new(&vs_d, adam, 2e-3, 0.0, Schedule::constant(), steps)?;
    let (ones, zeros) = (Tensor::full(&[BATCH, 1], 1.0)?, Tensor::full(&[BATCH, 1], 0.0)?);
    for step in 0..steps {
        let real = Tensor::from_slice(&normal(&mut rng, BATCH, MEAN, STD), &[BATCH, 1])?;
        let noise = Tensor::from_slice(&normal(&mut rng, BATCH * 4, 0.0, 1.0), &[BATCH, 4])?;
        let fake = generator.forward(&noise)?;
        // Discriminator: real -> 1, generated -> 0; detach keeps the generator out of this backward pass.
        let d_loss = loss::bce_with_logits(&critic.forward(&real)?, &ones)?.add(&loss::bce_with_logits(&critic.forward(&fake.detach())?, &zeros)?)?;
        opt_d.step(&vs_d, &d_loss.backward()?)?;
        // Generator: make the discriminator say 1. Its gradients reach the critic's weights too, but only
        // opt_g steps, and only over the generator's store.
        let g_loss = loss::bce_with_logits(&critic.forward(&fake)?, &ones)?;
        opt_g.step(&vs_g, &g_loss.backward()?)?;
        if step % 200 == 199 {
            println!("step {:4}  d_loss {:.3}  g_loss {:.3}", step + 1, d_loss.to_scalar()?, g_loss.to_scalar()?);
        }
    }
    let noise = Tensor::from_slice(&normal(&mut rng, 2000 * 4, 0.0, 1.0), &[2000, 4])?;
    let samples = no_grad(|| generator.forward(&noise))?.to_vec()?;
    let mean = samples.iter().sum::<f32>() / 2000.0;
    let std = (samples.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 2000.0).sqrt();
    Ok((mean, std))
}

fn main() -> anyhow::Result<()> {
    let (mean, std) = train(1000, 7)?;
    println!("generated samples: mean {mean:.3} (target {MEAN}), std {std:.3} (target {STD})");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn gan_learns_the_target_mean() {
        let (mean, std) = super::train(600, 11).expect("training");
        assert!((mean - super::MEAN).abs() < 0.3, "generated mean {mean}, target {}", super::MEAN);
        assert!(std > 0.1 && std < 1.5, "generated std {std}: collapsed or diverged");
    }
}
