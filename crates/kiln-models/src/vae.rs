//! Variational autoencoders (Kingma & Welling 2014) on MNIST-10k, with the numbers the field reports: the test
//! ELBO in nats per image on binarised digits, and an importance-weighted estimate of log p(x) (Burda et al.
//! 2016).
//!
//! - **Encoder**: 784 -> hidden (ReLU) -> the mean and log-variance of a diagonal Gaussian q(z|x).
//! - **Reparameterisation**: z = mu + exp(logvar / 2) eps, eps ~ N(0, I), so the gradient reaches the encoder.
//! - **KL term**, closed form against the prior N(0, I): KL = -1/2 sum(1 + logvar - mu^2 - exp(logvar)).
//! - **Decoder**: latent -> hidden (ReLU) -> 784 outputs. Bernoulli: the outputs are logits and
//!   log p(x|z) = sum(x l - softplus(l)). Gaussian: the means are sigmoid(outputs), one learned standard
//!   deviation for every pixel (`decoder.log_sigma`), log p(x|z) = sum(-(x - m)^2 / (2 s^2) - log s - log(2 pi) / 2).
//! - **Loss**: the negative ELBO with the KL weighted by `beta` (beta-VAE, Higgins et al. 2017; beta = 1 is
//!   the ELBO), averaged over the batch.
//!
//! Data: `kiln_data::load_split("mnist")`'s seeded split; training on its train and dev parts (8,000 digits),
//! binarised afresh at every step (pixel ~ Bernoulli(intensity)); the 2,000 test digits binarised once with
//! the fixed seed [`TEST_BINARISATION_SEED`].

use kiln_graph::{KilnError, Result, Rng, Tensor};
use kiln_nn::{Init, Layer, Linear, Module, Param, VarStore};

/// The seed of the test digits' one binarisation: the same binary test set for every run and every model.
pub const TEST_BINARISATION_SEED: u64 = 0xB1A5;

const PIXELS: usize = 784;
const LN_2PI: f64 = 1.8378770664093453;

/// The decoder's distribution over pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Likelihood {
    Bernoulli,
    Gaussian,
}

/// A VAE with one hidden layer each way.
pub struct Vae {
    pub enc: Linear,
    pub enc_mu: Linear,
    pub enc_logvar: Linear,
    pub dec: Linear,
    pub dec_out: Linear,
    /// The Gaussian decoder's log standard deviation (one for all pixels).
    pub log_sigma: Option<Param>,
    pub latent: usize,
    pub likelihood: Likelihood,
}

/// One batch's ELBO terms, per image [n]: the expected log-likelihood (one sample) and the KL divergence.
pub struct ElboTerms {
    pub log_likelihood: Tensor,
    pub kl: Tensor,
}

impl Vae {
    pub fn new(vs: &mut VarStore, latent: usize, hidden: usize, likelihood: Likelihood) -> Result<Vae> {
        if latent == 0 || hidden == 0 {
            return Err(KilnError::Usage(format!("vae: the latent size and hidden width must be above 0 (got latent {latent}, hidden {hidden})")));
        }
        let log_sigma = match likelihood {
            Likelihood::Gaussian => Some(vs.param("decoder.log_sigma", &[1], Init::Constant(-1.0), false)?),
            Likelihood::Bernoulli => None,
        };
        Ok(Vae {
            enc: Linear::new(vs, "encoder.hidden", PIXELS, hidden, Init::HeNormal)?,
            enc_mu: Linear::new(vs, "encoder.mu", hidden, latent, Init::XavierUniform)?,
            enc_logvar: Linear::new(vs, "encoder.logvar", hidden, latent, Init::XavierUniform)?,
            dec: Linear::new(vs, "decoder.hidden", latent, hidden, Init::HeNormal)?,
            dec_out: Linear::new(vs, "decoder.out", hidden, PIXELS, Init::XavierUniform)?,
            log_sigma,
            latent,
            likelihood,
        })
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        if x.rank() != 2 || x.shape()[1] != PIXELS {
            return Err(KilnError::Usage(format!("vae: expects images as [n, 784], got {:?}", x.shape())));
        }
        Ok(())
    }

    /// x [n, 784] -> (mu, logvar), each [n, latent].
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check(x)?;
        let h = self.enc.forward(x)?.relu()?;
        Ok((self.enc_mu.forward(&h)?, self.enc_logvar.forward(&h)?))
    }

    /// z [n, latent] -> the decoder's raw outputs [n, 784] (logits for Bernoulli, pre-sigmoid means for Gaussian).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.dec_out.forward(&self.dec.forward(z)?.relu()?)
    }

    /// The decoder's mean image in [0, 1] for z: sigmoid of the outputs for both likelihoods.
    pub fn mean_image(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(z)?.sigmoid()
    }

    /// log p(x | z) per image [n] from the decoder's outputs.
    pub fn log_likelihood(&self, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        match (&self.likelihood, &self.log_sigma) {
            (Likelihood::Gaussian, Some(ls)) => {
                let ls = ls.tensor()?;
                let d = x.sub(&out.sigmoid()?)?;
                let inv_var = ls.scale(-2.0)?.exp()?;
                let sq = d.mul(&d)?.sum(&[1], false)?.broadcast_mul(&inv_var)?.scale(-0.5)?;
                sq.broadcast_sub(&ls.scale(PIXELS as f32)?)?.add_scalar(-0.5 * PIXELS as f32 * LN_2PI as f32)
            }
            _ => x.mul(out)?.sub(&out.softplus()?)?.sum(&[1], false),
        }
    }

    /// The ELBO's terms for x [n, 784] with noise eps [n, latent] (one sample of z per image).
    pub fn elbo_terms(&self, x: &Tensor, eps: &Tensor) -> Result<ElboTerms> {
        let (mu, logvar) = self.encode(x)?;
        if eps.shape() != mu.shape() {
            return Err(KilnError::Usage(format!("vae: noise of shape {:?} for latents of shape {:?}", eps.shape(), mu.shape())));
        }
        let z = mu.add(&logvar.scale(0.5)?.exp()?.mul(eps)?)?;
        let log_likelihood = self.log_likelihood(x, &self.decode(&z)?)?;
        let kl = logvar.add_scalar(1.0)?.sub(&mu.mul(&mu)?)?.sub(&logvar.exp()?)?.sum(&[1], false)?.scale(-0.5)?;
        Ok(ElboTerms { log_likelihood, kl })
    }

    /// The training loss: mean over the batch of -(log p(x|z) - beta KL).
    pub fn loss(&self, x: &Tensor, eps: &Tensor, beta: f32) -> Result<Tensor> {
        let t = self.elbo_terms(x, eps)?;
        t.kl.scale(beta)?.sub(&t.log_likelihood)?.mean_all()
    }

    /// Importance-weighted estimates of log p(x) per image with `k` samples each (Burda et al. 2016):
    /// log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z | x), in f64 on the host from per-sample terms
    /// computed on the GPU.
    pub fn importance_weighted(&self, x: &[f32], k: usize, rng: &mut Rng) -> Result<Vec<f64>> {
        let n = x.len() / PIXELS;
        if k == 0 {
            return Err(KilnError::Usage("vae: importance sampling needs at least one sample".into()));
        }
        let per_chunk = (4096 / k).max(1);
        let mut out = Vec::with_capacity(n);
        kiln_graph::no_grad(|| {
            for from in (0..n).step_by(per_chunk) {
                let m = per_chunk.min(n - from);
                let xs = Tensor::from_slice(&x[from * PIXELS..(from + m) * PIXELS], &[m, PIXELS])?;
                let (mu, logvar) = self.encode(&xs)?;
                // Each image's row repeated k times: [m k, ...].
                let rep: Vec<u32> = (0..m as u32).flat_map(|i| std::iter::repeat_n(i, k)).collect();
                let rep = Tensor::from_u32(&rep, &[m * k])?;
                let (mu, logvar, xr) = (mu.index_select(0, &rep)?, logvar.index_select(0, &rep)?, xs.index_select(0, &rep)?);
                let eps = Tensor::randn(&[m * k, self.latent], 1.0, rng)?;
                let z = mu.add(&logvar.scale(0.5)?.exp()?.mul(&eps)?)?;
                let log_px_z = self.log_likelihood(&xr, &self.decode(&z)?)?.to_vec()?;
                let log_pz: Vec<f32> = z.mul(&z)?.sum(&[1], false)?.to_vec()?;
                let log_q: Vec<f32> = eps.mul(&eps)?.add(&logvar)?.sum(&[1], false)?.to_vec()?;
                for i in 0..m {
                    let w: Vec<f64> = (0..k)
                        .map(|j| {
                            let r = i * k + j;
                            // log p(z) - log q(z|x): the 2 pi terms cancel.
                            log_px_z[r] as f64 - 0.5 * log_pz[r] as f64 + 0.5 * log_q[r] as f64
                        })
                        .collect();
                    let top = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    out.push(top + (w.iter().map(|v| (v - top).exp()).sum::<f64>() / k as f64).ln());
                }
            }
            Ok(out)
        })
    }
}

impl Module for Vae {
    fn describe(&self) -> String {
        format!("Vae(latent={}, {:?})", self.latent, self.likelihood)
    }
    fn own_params(&self) -> Vec<&Param> {
        self.log_sigma.iter().collect()
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("encoder.hidden".into(), &self.enc as &dyn Module),
            ("encoder.mu".into(), &self.enc_mu),
            ("encoder.logvar".into(), &self.enc_logvar),
            ("decoder.hidden".into(), &self.dec),
            ("decoder.out".into(), &self.dec_out),
        ]
    }
}

/// Pixels ~ Bernoulli(intensity), from `rng`.
pub fn binarise(x: &[f32], rng: &mut Rng) -> Vec<f32> {
    x.iter().map(|&p| (rng.uniform() < p as f64) as u8 as f32).collect()
}

/// What a VAE run trains and how long.
#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub latent: usize,
    pub hidden: usize,
    pub likelihood: Likelihood,
    pub beta: f32,
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f32,
    pub seed: u64,
    /// Importance samples per test image for the log p(x) estimate (0: skip it).
    pub iw_samples: usize,
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig { latent: 20, hidden: 400, likelihood: Likelihood::Bernoulli, beta: 1.0, steps: 8000, batch_size: 100, lr: 1e-3, seed: 42, iw_samples: 100, data_dir: None }
    }
}

/// What a VAE run measured on the test digits, in nats per image: binarised for the Bernoulli decoder, their
/// intensities for the Gaussian one (a density on [0, 1]^784, so its figures are not comparable with the
/// Bernoulli decoder's probabilities).
#[derive(Clone, Debug, serde::Serialize)]
pub struct VaeReport {
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// The test ELBO (its one-sample estimate averaged over 10 draws per image), and its two parts.
    pub test_elbo: f64,
    pub test_log_likelihood: f64,
    pub test_kl: f64,
    /// The importance-weighted estimate of log p(x) with `iw_samples` samples (NaN when skipped).
    pub test_log_px: f64,
    pub iw_samples: usize,
    pub test_images: usize,
    /// What the test digits were: "binarised" or "intensities".
    pub test_data: &'static str,
    pub ms_per_step: f64,
    pub parameters: usize,
}

/// The training digits (train and dev parts of the seeded MNIST-10k split, intensities) and the test digits
/// binarised with [`TEST_BINARISATION_SEED`].
pub fn vae_data(seed: u64, data_dir: Option<&std::path::Path>) -> Result<(Vec<f32>, Vec<f32>)> {
    let split = kiln_data::load_split("mnist", data_dir, seed).map_err(|e| KilnError::Data(e.to_string()))?;
    let mut train = split.train.x.clone();
    train.extend_from_slice(&split.dev.x);
    let test = binarise(&split.test.x, &mut Rng::new(TEST_BINARISATION_SEED));
    Ok((train, test))
}

/// The test ELBO and its parts (nats per image), averaged over the images and `draws` samples of z each.
pub fn test_elbo(model: &Vae, test: &[f32], draws: usize, rng: &mut Rng) -> Result<(f64, f64, f64)> {
    let n = test.len() / PIXELS;
    let (mut ll, mut kl) = (0.0, 0.0);
    kiln_graph::no_grad(|| -> Result<()> {
        for from in (0..n).step_by(500) {
            let m = 500.min(n - from);
            let x = Tensor::from_slice(&test[from * PIXELS..(from + m) * PIXELS], &[m, PIXELS])?;
            for _ in 0..draws {
                let t = model.elbo_terms(&x, &Tensor::randn(&[m, model.latent], 1.0, rng)?)?;
                ll += t.log_likelihood.sum_all()?.to_scalar()? as f64;
                kl += t.kl.sum_all()?.to_scalar()? as f64;
            }
        }
        Ok(())
    })?;
    let per = (n * draws.max(1)) as f64;
    Ok(((ll - kl) / per, ll / per, kl / per))
}

/// Trains a VAE on dynamically binarised digits and scores the fixed binary test set (Bernoulli decoder), or
/// on the digits' intensities, scoring the test digits' intensities (Gaussian decoder: the data it models).
pub fn train_vae(cfg: &VaeConfig, mut progress: impl FnMut(u64, f32)) -> Result<(Vae, VaeReport)> {
    if cfg.batch_size == 0 {
        return Err(KilnError::Usage("vae: the batch size must be above 0".into()));
    }
    let (train, test) = vae_data(cfg.seed, cfg.data_dir.as_deref())?;
    let (test, test_data) = match cfg.likelihood {
        Likelihood::Bernoulli => (test, "binarised"),
        Likelihood::Gaussian => (kiln_data::load_split("mnist", cfg.data_dir.as_deref(), cfg.seed).map_err(|e| KilnError::Data(e.to_string()))?.test.x, "intensities"),
    };
    let n = train.len() / PIXELS;
    let mut vs = VarStore::new(cfg.seed);
    let model = Vae::new(&mut vs, cfg.latent, cfg.hidden, cfg.likelihood)?;
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, cfg.lr, cfg.steps, None)?;
    let mut rng = Rng::new(cfg.seed ^ 0x7ae);
    let mut order: Vec<usize> = (0..n).collect();
    let started = std::time::Instant::now();
    let mut trace = crate::trainer::LossTrace::default();
    let mut at = n;
    for step in 0..cfg.steps {
        let mut batch = Vec::with_capacity(cfg.batch_size * PIXELS);
        for _ in 0..cfg.batch_size {
            if at == n {
                rng.shuffle(&mut order);
                at = 0;
            }
            batch.extend_from_slice(&train[order[at] * PIXELS..(order[at] + 1) * PIXELS]);
            at += 1;
        }
        let x = match cfg.likelihood {
            Likelihood::Bernoulli => binarise(&batch, &mut rng),
            Likelihood::Gaussian => batch,
        };
        let x = Tensor::from_slice(&x, &[cfg.batch_size, PIXELS])?;
        let eps = Tensor::randn(&[cfg.batch_size, cfg.latent], 1.0, &mut rng)?;
        let l = model.loss(&x, &eps, cfg.beta)?;
        opt.step(&vs, &l.backward()?)?;
        trace.record(step, &l, &mut progress)?;
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    let mut eval_rng = Rng::new(cfg.seed ^ 0xe7a1);
    let (test_elbo, test_log_likelihood, test_kl) = test_elbo(&model, &test, 10, &mut eval_rng)?;
    let test_log_px = if cfg.iw_samples > 0 {
        let w = model.importance_weighted(&test, cfg.iw_samples, &mut eval_rng)?;
        w.iter().sum::<f64>() / w.len().max(1) as f64
    } else {
        f64::NAN
    };
    let report = VaeReport {
        steps: cfg.steps,
        first_loss: trace.first,
        last_loss: trace.last,
        test_elbo,
        test_log_likelihood,
        test_kl,
        test_log_px,
        iw_samples: cfg.iw_samples,
        test_images: test.len() / PIXELS,
        test_data,
        ms_per_step,
        parameters: vs.num_values(),
    };
    Ok((model, report))
}

/// PNGs of a trained VAE in `dir`: `samples.png` (an 8 x 8 grid of decoded z ~ N(0, I)), `interpolations.png`
/// (8 rows: the means of two test digits' codes and 8 steps between them), and for a 2-D latent
/// `manifold.png` (a 20 x 20 grid of decoded points spaced evenly over [-2, 2]^2). Returns the files written.
pub fn vae_pictures(model: &Vae, test: &[f32], seed: u64, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let io = |p: &std::path::Path, e: std::io::Error| KilnError::Data(format!("writing {}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut rng = Rng::new(seed ^ 0x5a3);
    let mut written = Vec::new();
    let (z_dim, mut files) = (model.latent, Vec::new());
    kiln_graph::no_grad(|| -> Result<()> {
        let samples = model.mean_image(&Tensor::randn(&[64, z_dim], 1.0, &mut rng)?)?.to_vec()?;
        files.push(("samples.png", samples, 8));
        let (mu, _) = model.encode(&Tensor::from_slice(&test[..16 * PIXELS], &[16, PIXELS])?)?;
        let mu = mu.to_vec()?;
        let mut zs = Vec::with_capacity(8 * 10 * z_dim);
        for r in 0..8 {
            let (a, b) = (&mu[2 * r * z_dim..(2 * r + 1) * z_dim], &mu[(2 * r + 1) * z_dim..(2 * r + 2) * z_dim]);
            for s in 0..10 {
                let t = s as f32 / 9.0;
                zs.extend(a.iter().zip(b).map(|(x, y)| (1.0 - t) * x + t * y));
            }
        }
        files.push(("interpolations.png", model.mean_image(&Tensor::from_slice(&zs, &[80, z_dim])?)?.to_vec()?, 10));
        if z_dim == 2 {
            let grid: Vec<f32> = (0..400).flat_map(|k| [-2.0 + 4.0 * (k % 20) as f32 / 19.0, 2.0 - 4.0 * (k / 20) as f32 / 19.0]).collect();
            files.push(("manifold.png", model.mean_image(&Tensor::from_slice(&grid, &[400, 2])?)?.to_vec()?, 20));
        }
        Ok(())
    })?;
    for (name, images, cols) in files {
        let path = dir.join(name);
        crate::plot::image_grid_png(&path, &images, 28, cols, 2).map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}
