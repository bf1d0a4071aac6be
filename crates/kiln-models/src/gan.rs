//! Generative adversarial networks (Goodfellow et al. 2014): the minimax game and the non-saturating generator
//! loss, alternating discriminator and generator steps with an optimizer each; a 1-D sanity case; DCGAN
//! (Radford et al. 2016) on Fashion-MNIST or MNIST-10k; and WGAN-GP's critic loss with the gradient penalty
//! (Gulrajani et al. 2017) through gradients of gradients.
//!
//! The losses, for discriminator logits l (D = sigmoid(l)):
//! - discriminator: -log D(x) - log(1 - D(G(z))) = softplus(-l_real) + softplus(l_fake), each averaged;
//! - generator, minimax (the seed's game): log(1 - D(G(z))) = -softplus(l_fake), averaged (it saturates when
//!   D wins early: its gradient vanishes as D(G(z)) goes to 0);
//! - generator, non-saturating: -log D(G(z)) = softplus(-l_fake), averaged;
//! - WGAN-GP critic: mean c(G(z)) - mean c(x) + lambda mean (|grad c(x_hat)| - 1)^2 at x_hat = e x + (1 - e)
//!   G(z), e ~ U(0, 1) per image; generator: -mean c(G(z)).

use kiln_graph::{KilnError, Result, Rng, Tensor};
use kiln_nn::schedule::{LrSchedule, Schedule};
use kiln_nn::{Activation, BatchNorm, Conv2d, Conv2dConfig, ConvTranspose2d, Init, Layer, Linear, Module, Optimizer, OptimizerKind, Param, Sequential, VarStore};

/// The generator's loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum GeneratorLoss {
    Minimax,
    NonSaturating,
}

/// The discriminator's loss from its logits on real [n, 1] and generated [m, 1] samples.
pub fn discriminator_loss(real_logits: &Tensor, fake_logits: &Tensor) -> Result<Tensor> {
    real_logits.neg()?.softplus()?.mean_all()?.add(&fake_logits.softplus()?.mean_all()?)
}

/// The generator's loss from the discriminator's logits on generated samples.
pub fn generator_loss(fake_logits: &Tensor, kind: GeneratorLoss) -> Result<Tensor> {
    match kind {
        GeneratorLoss::Minimax => fake_logits.softplus()?.mean_all()?.neg(),
        GeneratorLoss::NonSaturating => fake_logits.neg()?.softplus()?.mean_all(),
    }
}

/// WGAN-GP's penalty lambda mean (|grad_x c(x_hat)|_2 - 1)^2 over images x_hat = e real + (1 - e) fake, e
/// uniform per image; on the tape, so the critic's parameters get its gradient (a gradient of a gradient).
pub fn gradient_penalty(critic: &dyn Fn(&Tensor) -> Result<Tensor>, real: &Tensor, fake: &Tensor, lambda: f32, rng: &mut Rng) -> Result<Tensor> {
    if real.shape() != fake.shape() || real.rank() < 2 {
        return Err(KilnError::Usage(format!("gradient_penalty: real {:?} and generated {:?} batches must have one shape [n, ...]", real.shape(), fake.shape())));
    }
    let n = real.shape()[0];
    let per = real.numel() / n.max(1);
    let mut shape = vec![n];
    shape.extend(std::iter::repeat_n(1, real.rank() - 1));
    let e = Tensor::from_slice_on(real.device(), &(0..n).map(|_| rng.uniform() as f32).collect::<Vec<_>>(), &shape)?;
    let mixed = real.detach().broadcast_mul(&e)?.add(&fake.detach().broadcast_mul(&e.affine(-1.0, 1.0)?)?)?.var();
    let scores = critic(&mixed)?.sum_all()?;
    let g = scores.backward_create_graph()?.get(&mixed).cloned().ok_or_else(|| KilnError::Usage("gradient_penalty: the critic's output does not depend on its input".into()))?;
    let norms = g.reshape(&[n, per])?.mul(&g.reshape(&[n, per])?)?.sum(&[1], false)?.add_scalar(1e-12)?.sqrt()?;
    norms.add_scalar(-1.0)?.powf(2.0)?.mean_all()?.scale(lambda)
}

/// Adam with the DCGAN paper's betas (0.5, 0.999) at a constant rate.
pub fn gan_adam(vs: &VarStore, lr: f32, beta1: f32, steps: u64) -> Result<Optimizer> {
    Optimizer::new(vs, OptimizerKind::Adam { beta1, beta2: 0.999, eps: 1e-8 }, lr, 0.0, Schedule { kind: LrSchedule::Constant, warmup: 0 }, steps.max(1))
}

// ---- The 1-D sanity case.

/// What the 1-D GAN learned: the mean and standard deviation of 10,000 generated samples against the target's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Gan1dReport {
    pub target_mean: f64,
    pub target_std: f64,
    pub mean: f64,
    pub std: f64,
    pub steps: u64,
}

/// A GAN whose data are draws from N(mean, std^2): the generator an MLP 4 -> 32 -> 1 (ReLU) from 4-d Gaussian
/// noise, the discriminator 1 -> 32 -> 32 -> 1 (leaky ReLU 0.2); one discriminator step then one generator
/// step, batch 128, Adam 1e-3 (0.5, 0.999) each.
pub fn train_gan_1d(mean: f32, std: f32, steps: u64, kind: GeneratorLoss, seed: u64) -> Result<Gan1dReport> {
    let mut gvs = VarStore::new(seed);
    let generator = Sequential::new().push(Linear::new(&mut gvs, "g.0", 4, 32, Init::HeNormal)?).push(Activation::Relu).push(Linear::new(&mut gvs, "g.2", 32, 1, Init::XavierUniform)?);
    gvs.finish()?;
    let mut dvs = VarStore::new(seed ^ 1);
    let discriminator = Sequential::new()
        .push(Linear::new(&mut dvs, "d.0", 1, 32, Init::HeNormal)?)
        .push(Activation::LeakyRelu(0.2))
        .push(Linear::new(&mut dvs, "d.2", 32, 32, Init::HeNormal)?)
        .push(Activation::LeakyRelu(0.2))
        .push(Linear::new(&mut dvs, "d.4", 32, 1, Init::XavierUniform)?);
    dvs.finish()?;
    let (mut gopt, mut dopt) = (gan_adam(&gvs, 1e-3, 0.5, steps)?, gan_adam(&dvs, 1e-3, 0.5, steps)?);
    let mut rng = Rng::new(seed);
    let batch = 128;
    for _ in 0..steps {
        let real: Vec<f32> = (0..batch).map(|_| mean + std * rng.normal() as f32).collect();
        let real = Tensor::from_slice(&real, &[batch, 1])?;
        let fake = generator.forward(&Tensor::randn(&[batch, 4], 1.0, &mut rng)?)?;
        let d_loss = discriminator_loss(&discriminator.forward(&real)?, &discriminator.forward(&fake.detach())?)?;
        dopt.step(&dvs, &d_loss.backward()?)?;
        let g_loss = generator_loss(&discriminator.forward(&fake)?, kind)?;
        gopt.step(&gvs, &g_loss.backward()?)?;
        // Reading a value ends the step's recording (a loop that never reads keeps every step's buffers).
        g_loss.to_scalar()?;
    }
    let samples = kiln_graph::no_grad(|| generator.forward(&Tensor::randn(&[10_000, 4], 1.0, &mut rng)?))?.to_vec()?;
    let m = samples.iter().map(|&v| v as f64).sum::<f64>() / samples.len() as f64;
    let s = (samples.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / samples.len() as f64).sqrt();
    Ok(Gan1dReport { target_mean: mean as f64, target_std: std as f64, mean: m, std: s, steps })
}

// ---- DCGAN.

/// DCGAN's generator for 28 x 28 images: z -> a linear layer to (2 width) x 7 x 7, batch norm, ReLU; a 4x4
/// stride-2 transposed convolution to width x 14 x 14, batch norm, ReLU; another to 1 x 28 x 28 and tanh.
/// No pooling, no fully connected hidden layers (the paper's guidelines).
pub struct Generator {
    pub latent: usize,
    pub width: usize,
    pub project: Linear,
    pub bn0: BatchNorm,
    pub up1: ConvTranspose2d,
    pub bn1: BatchNorm,
    pub up2: ConvTranspose2d,
}

impl Generator {
    pub fn new(vs: &mut VarStore, latent: usize, width: usize) -> Result<Generator> {
        if latent == 0 || width == 0 {
            return Err(KilnError::Usage(format!("dcgan: the latent size and width must be above 0 (got latent {latent}, width {width})")));
        }
        Ok(Generator {
            latent,
            width,
            project: Linear::new(vs, "generator.project", latent, 2 * width * 49, Init::Normal { std: 0.02 })?,
            bn0: BatchNorm::new(vs, "generator.bn0", 2 * width)?,
            up1: ConvTranspose2d::new(vs, "generator.up1", 2 * width, width, 4, 2, 1, 0, 1, false)?,
            bn1: BatchNorm::new(vs, "generator.bn1", width)?,
            up2: ConvTranspose2d::new(vs, "generator.up2", width, 1, 4, 2, 1, 0, 1, true)?,
        })
    }

    /// z [n, latent] -> images [n, 1, 28, 28] in [-1, 1].
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.shape()[0];
        let x = self.project.forward(z)?.reshape(&[n, 2 * self.width, 7, 7])?;
        let x = self.bn0.forward(&x)?.relu()?;
        let x = self.bn1.forward(&self.up1.forward(&x)?)?.relu()?;
        self.up2.forward(&x)?.tanh()
    }
}

impl Module for Generator {
    fn describe(&self) -> String {
        format!("Generator(latent={}, width={})", self.latent, self.width)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("generator.project".into(), &self.project as &dyn Module),
            ("generator.bn0".into(), &self.bn0),
            ("generator.up1".into(), &self.up1),
            ("generator.bn1".into(), &self.bn1),
            ("generator.up2".into(), &self.up2),
        ]
    }
    fn set_training(&mut self, training: bool) {
        self.bn0.set_training(training);
        self.bn1.set_training(training);
    }
}

/// DCGAN's discriminator: 4x4 stride-2 convolutions 1 -> width (leaky ReLU 0.2) -> 2 width (batch norm,
/// leaky ReLU), then a linear layer to one logit. `batch_norm` false makes it a WGAN-GP critic (the penalty
/// is per image, which batch statistics would break).
pub struct Discriminator {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub bn2: Option<BatchNorm>,
    pub out: Linear,
    pub width: usize,
}

impl Discriminator {
    pub fn new(vs: &mut VarStore, width: usize, batch_norm: bool) -> Result<Discriminator> {
        let down = Conv2dConfig { stride: 2, padding: kiln_nn::Padding::Explicit(1, 1), init: Init::Normal { std: 0.02 }, ..Default::default() };
        Ok(Discriminator {
            conv1: Conv2d::new(vs, "discriminator.conv1", 1, width, 4, down)?,
            conv2: Conv2d::new(vs, "discriminator.conv2", width, 2 * width, 4, down)?,
            bn2: if batch_norm { Some(BatchNorm::new(vs, "discriminator.bn2", 2 * width)?) } else { None },
            out: Linear::new(vs, "discriminator.out", 2 * width * 49, 1, Init::Normal { std: 0.02 })?,
            width,
        })
    }

    /// images [n, 1, 28, 28] -> logits [n, 1].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.shape()[0];
        let h = self.conv1.forward(x)?.leaky_relu(0.2)?;
        let mut h = self.conv2.forward(&h)?;
        if let Some(bn) = &self.bn2 {
            h = bn.forward(&h)?;
        }
        self.out.forward(&h.leaky_relu(0.2)?.reshape(&[n, 2 * self.width * 49])?)
    }
}

impl Module for Discriminator {
    fn describe(&self) -> String {
        format!("Discriminator(width={}, batch norm: {})", self.width, self.bn2.is_some())
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("discriminator.conv1".into(), &self.conv1), ("discriminator.conv2".into(), &self.conv2)];
        if let Some(bn) = &self.bn2 {
            v.push(("discriminator.bn2".into(), bn));
        }
        v.push(("discriminator.out".into(), &self.out));
        v
    }
    fn set_training(&mut self, training: bool) {
        if let Some(bn) = &mut self.bn2 {
            bn.set_training(training);
        }
    }
}

/// How a DCGAN run plays the game.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum GanObjective {
    /// The discriminator's cross-entropy and this generator loss.
    Standard(GeneratorLoss),
    /// WGAN-GP: a critic without batch norm, `n_critic` critic steps per generator step, penalty `lambda`.
    WganGp { lambda: f32, n_critic: usize },
}

/// What a DCGAN run trains on.
#[derive(Clone, Debug)]
pub struct DcganConfig {
    /// "fashion-mnist" or "mnist" (MNIST-10k's training part).
    pub dataset: String,
    pub objective: GanObjective,
    pub latent: usize,
    pub width: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub seed: u64,
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for DcganConfig {
    fn default() -> Self {
        DcganConfig {
            dataset: "fashion-mnist".into(),
            objective: GanObjective::Standard(GeneratorLoss::NonSaturating),
            latent: 64,
            width: 32,
            epochs: 5,
            batch_size: 64,
            lr: 2e-4,
            seed: 42,
            data_dir: None,
        }
    }
}

/// Training images in [-1, 1] (the data set's training part) as [n, 784].
pub fn gan_images(dataset: &str, data_dir: Option<&std::path::Path>, seed: u64) -> Result<Vec<f32>> {
    let data_err = |e: kiln_data::DataError| KilnError::Data(e.to_string());
    let x = match dataset {
        "fashion-mnist" => kiln_data::load_fashion_mnist(data_dir).map_err(data_err)?.0.x,
        "mnist" => kiln_data::load_split("mnist", data_dir, seed).map_err(data_err)?.train.x,
        other => return Err(KilnError::Usage(format!("dcgan: trains on fashion-mnist or mnist, not {other}"))),
    };
    Ok(x.into_iter().map(|v| 2.0 * v - 1.0).collect())
}

/// The losses at the end of each epoch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DcganEpoch {
    pub epoch: usize,
    pub d_loss: f64,
    pub g_loss: f64,
    pub seconds: f64,
}

/// Trains a DCGAN; `on_epoch(epoch, generator)` runs after every epoch (sample grids, scores). Returns the
/// generator, the discriminator and the epochs' losses.
pub fn train_dcgan(cfg: &DcganConfig, mut progress: impl FnMut(u64, f32, f32), mut on_epoch: impl FnMut(usize, &Generator) -> Result<()>) -> Result<(Generator, Discriminator, Vec<DcganEpoch>)> {
    if cfg.batch_size < 2 || cfg.epochs == 0 {
        return Err(KilnError::Usage(format!("dcgan: a batch of at least 2 and an epoch or more are needed (batch {}, {} epochs)", cfg.batch_size, cfg.epochs)));
    }
    let images = gan_images(&cfg.dataset, cfg.data_dir.as_deref(), cfg.seed)?;
    let n = images.len() / 784;
    let per_epoch = n / cfg.batch_size;
    let mut gvs = VarStore::new(cfg.seed);
    let generator = Generator::new(&mut gvs, cfg.latent, cfg.width)?;
    gvs.finish()?;
    let wgan = matches!(cfg.objective, GanObjective::WganGp { .. });
    let mut dvs = VarStore::new(cfg.seed ^ 1);
    let discriminator = Discriminator::new(&mut dvs, cfg.width, !wgan)?;
    dvs.finish()?;
    let total = (per_epoch * cfg.epochs) as u64;
    // WGAN-GP's paper uses Adam (0, 0.9) at 1e-4; DCGAN's (0.5, 0.999) at 2e-4.
    let beta1 = if wgan { 0.0 } else { 0.5 };
    let (mut gopt, mut dopt) = (gan_adam(&gvs, cfg.lr, beta1, total)?, gan_adam(&dvs, cfg.lr, beta1, total)?);
    let mut rng = Rng::new(cfg.seed ^ 0x6a7);
    let mut order: Vec<usize> = (0..n).collect();
    let started = std::time::Instant::now();
    let mut epochs = Vec::new();
    let mut step = 0u64;
    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let (mut d_sum, mut g_sum, mut g_count) = (0.0, 0.0, 0usize);
        for b in 0..per_epoch {
            let px: Vec<f32> = order[b * cfg.batch_size..(b + 1) * cfg.batch_size].iter().flat_map(|&i| images[i * 784..(i + 1) * 784].iter().copied()).collect();
            let real = Tensor::from_slice(&px, &[cfg.batch_size, 1, 28, 28])?;
            let fake = generator.forward(&Tensor::randn(&[cfg.batch_size, cfg.latent], 1.0, &mut rng)?)?;
            let d_loss = match cfg.objective {
                GanObjective::Standard(_) => discriminator_loss(&discriminator.forward(&real)?, &discriminator.forward(&fake.detach())?)?,
                GanObjective::WganGp { lambda, .. } => {
                    let critic = |x: &Tensor| discriminator.forward(x);
                    let gap = discriminator.forward(&fake.detach())?.mean_all()?.sub(&discriminator.forward(&real)?.mean_all()?)?;
                    gap.add(&gradient_penalty(&critic, &real, &fake, lambda, &mut rng)?)?
                }
            };
            dopt.step(&dvs, &d_loss.backward()?)?;
            let d_value = d_loss.to_scalar()? as f64;
            d_sum += d_value;
            let g_turn = match cfg.objective {
                GanObjective::WganGp { n_critic, .. } => b % n_critic.max(1) == 0,
                GanObjective::Standard(_) => true,
            };
            let mut g_value = f64::NAN;
            if g_turn {
                let logits = discriminator.forward(&fake)?;
                let g_loss = match cfg.objective {
                    GanObjective::Standard(kind) => generator_loss(&logits, kind)?,
                    GanObjective::WganGp { .. } => logits.mean_all()?.neg()?,
                };
                gopt.step(&gvs, &g_loss.backward()?)?;
                g_value = g_loss.to_scalar()? as f64;
                g_sum += g_value;
                g_count += 1;
            }
            step += 1;
            progress(step, d_value as f32, g_value as f32);
        }
        epochs.push(DcganEpoch { epoch, d_loss: d_sum / per_epoch.max(1) as f64, g_loss: g_sum / g_count.max(1) as f64, seconds: started.elapsed().as_secs_f64() });
        on_epoch(epoch, &generator)?;
    }
    Ok((generator, discriminator, epochs))
}

/// `count` generated images [count, 784] in [0, 1] from noise drawn with `seed` (the same seed, the same
/// noise: a fixed-noise grid that shows one generator's progress).
pub fn generate(generator: &Generator, count: usize, seed: u64) -> Result<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(count * 784);
    for from in (0..count).step_by(500) {
        let m = 500.min(count - from);
        let x = kiln_graph::no_grad(|| generator.forward(&Tensor::randn(&[m, generator.latent], 1.0, &mut rng)?))?;
        out.extend(x.to_vec()?.into_iter().map(|v| 0.5 * (v + 1.0)));
    }
    Ok(out)
}
