//! Autoencoders on 28 x 28 digits or clothes: an MLP and a convolutional one, each also as a denoising
//! autoencoder (Vincent et al. 2008: corrupted inputs, clean targets).
//!
//! - **MLP**: 784 -> 256 (ReLU) -> code -> 256 (ReLU) -> 784.
//! - **Convolutional**: 3x3 stride-2 convolutions 1 -> 16 -> 32 channels (ReLU; 28 -> 14 -> 7), a linear layer
//!   to the code; back through a linear layer to 32 x 7 x 7 and 4x4 stride-2 transposed convolutions
//!   32 -> 16 -> 1 (ReLU between).
//! - **Loss**: binary cross-entropy between the output logits and the clean intensities in [0, 1] (the usual
//!   reconstruction loss for such images), averaged over pixels; the report adds the mean squared error of
//!   sigmoid(output).
//! - **Noise** for the denoising variant: Gaussian (std `noise`) added to the input and clipped to [0, 1].

use kiln_graph::{KilnError, Result, Rng, Tensor};
use kiln_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, Init, Layer, Linear, Module, Padding, Param, VarStore};

/// Which autoencoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AeKind {
    Mlp,
    Conv,
}

/// An autoencoder for [n, 784] images.
pub struct Autoencoder {
    pub kind: AeKind,
    pub code: usize,
    enc: Vec<Linear>,
    dec: Vec<Linear>,
    convs: Vec<Conv2d>,
    ups: Vec<ConvTranspose2d>,
}

impl Autoencoder {
    pub fn new(vs: &mut VarStore, kind: AeKind, code: usize) -> Result<Autoencoder> {
        if code == 0 {
            return Err(KilnError::Usage("autoencoder: the code size must be above 0".into()));
        }
        let (mut enc, mut dec, mut convs, mut ups) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        match kind {
            AeKind::Mlp => {
                enc.push(Linear::new(vs, "encoder.0", 784, 256, Init::HeNormal)?);
                enc.push(Linear::new(vs, "encoder.1", 256, code, Init::XavierUniform)?);
                dec.push(Linear::new(vs, "decoder.0", code, 256, Init::HeNormal)?);
                dec.push(Linear::new(vs, "decoder.1", 256, 784, Init::XavierUniform)?);
            }
            AeKind::Conv => {
                let down = Conv2dConfig { stride: 2, padding: Padding::Explicit(1, 1), ..Default::default() };
                convs.push(Conv2d::new(vs, "encoder.conv0", 1, 16, 3, down)?);
                convs.push(Conv2d::new(vs, "encoder.conv1", 16, 32, 3, down)?);
                enc.push(Linear::new(vs, "encoder.code", 32 * 49, code, Init::XavierUniform)?);
                dec.push(Linear::new(vs, "decoder.project", code, 32 * 49, Init::HeNormal)?);
                ups.push(ConvTranspose2d::new(vs, "decoder.up0", 32, 16, 4, 2, 1, 0, 1, true)?);
                ups.push(ConvTranspose2d::new(vs, "decoder.up1", 16, 1, 4, 2, 1, 0, 1, true)?);
            }
        }
        Ok(Autoencoder { kind, code, enc, dec, convs, ups })
    }

    /// images [n, 784] -> codes [n, code].
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 2 || x.shape()[1] != 784 {
            return Err(KilnError::Usage(format!("autoencoder: expects images as [n, 784], got {:?}", x.shape())));
        }
        let n = x.shape()[0];
        match self.kind {
            AeKind::Mlp => self.enc[1].forward(&self.enc[0].forward(x)?.relu()?),
            AeKind::Conv => {
                let h = self.convs[0].forward(&x.reshape(&[n, 1, 28, 28])?)?.relu()?;
                let h = self.convs[1].forward(&h)?.relu()?;
                self.enc[0].forward(&h.reshape(&[n, 32 * 49])?)
            }
        }
    }

    /// codes [n, code] -> output logits [n, 784].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.shape()[0];
        match self.kind {
            AeKind::Mlp => self.dec[1].forward(&self.dec[0].forward(z)?.relu()?),
            AeKind::Conv => {
                let h = self.dec[0].forward(z)?.relu()?.reshape(&[n, 32, 7, 7])?;
                let h = self.ups[0].forward(&h)?.relu()?;
                self.ups[1].forward(&h)?.reshape(&[n, 784])
            }
        }
    }

    /// The reconstruction loss of `input` against `target` (both [n, 784], target in [0, 1]).
    pub fn loss(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        kiln_graph::loss::bce_with_logits(&self.decode(&self.encode(input)?)?, target)
    }
}

impl Module for Autoencoder {
    fn describe(&self) -> String {
        format!("Autoencoder({:?}, code {})", self.kind, self.code)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = Vec::new();
        for (i, c) in self.convs.iter().enumerate() {
            v.push((format!("encoder.conv{i}"), c));
        }
        for (i, l) in self.enc.iter().enumerate() {
            v.push((format!("encoder.{i}"), l));
        }
        for (i, l) in self.dec.iter().enumerate() {
            v.push((format!("decoder.{i}"), l));
        }
        for (i, u) in self.ups.iter().enumerate() {
            v.push((format!("decoder.up{i}"), u));
        }
        v
    }
}

/// Gaussian noise of standard deviation `std`, clipped to [0, 1].
pub fn corrupt(x: &[f32], std: f32, rng: &mut Rng) -> Vec<f32> {
    x.iter().map(|&v| (v + std * rng.normal() as f32).clamp(0.0, 1.0)).collect()
}

/// What an autoencoder run trains.
#[derive(Clone, Debug)]
pub struct AeConfig {
    /// "mnist" (MNIST-10k's seeded split) or "fashion-mnist".
    pub dataset: String,
    pub kind: AeKind,
    pub code: usize,
    /// Input noise for a denoising autoencoder (0: a plain one).
    pub noise: f32,
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f32,
    pub seed: u64,
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for AeConfig {
    fn default() -> Self {
        AeConfig { dataset: "mnist".into(), kind: AeKind::Conv, code: 32, noise: 0.0, steps: 2000, batch_size: 64, lr: 1e-3, seed: 42, data_dir: None }
    }
}

/// What an autoencoder run measured on the test images (with the same noise for a denoising one).
#[derive(Clone, Debug, serde::Serialize)]
pub struct AeReport {
    pub kind: AeKind,
    pub noise: f32,
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub test_bce: f64,
    /// Mean squared error of the reconstructions against the clean images.
    pub test_mse: f64,
    /// The same for the (noisy) inputs themselves: what a denoiser must beat.
    pub input_mse: f64,
    pub ms_per_step: f64,
    pub parameters: usize,
}

/// Trains an autoencoder and scores the test images; returns it with the report and the first 8 test images
/// as (input, reconstruction, clean) for a picture.
pub fn train_autoencoder(cfg: &AeConfig, mut progress: impl FnMut(u64, f32)) -> Result<(Autoencoder, AeReport, [Vec<f32>; 3])> {
    let data_err = |e: kiln_data::DataError| KilnError::Data(e.to_string());
    if cfg.batch_size == 0 || !(0.0..=1.0).contains(&cfg.noise) {
        return Err(KilnError::Usage(format!("autoencoder: a batch above 0 and noise in [0, 1] are needed (batch {}, noise {})", cfg.batch_size, cfg.noise)));
    }
    let split = kiln_data::load_split(&cfg.dataset, cfg.data_dir.as_deref(), cfg.seed).map_err(data_err)?;
    let (train, test) = (split.train.x, split.test.x);
    let n = train.len() / 784;
    let mut vs = VarStore::new(cfg.seed);
    let model = Autoencoder::new(&mut vs, cfg.kind, cfg.code)?;
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, cfg.lr, cfg.steps, None)?;
    let mut rng = Rng::new(cfg.seed ^ 0xae);
    let started = std::time::Instant::now();
    let mut trace = crate::trainer::LossTrace::default();
    for step in 0..cfg.steps {
        let clean: Vec<f32> = (0..cfg.batch_size)
            .flat_map(|_| {
                let i = rng.below(n);
                train[i * 784..(i + 1) * 784].to_vec()
            })
            .collect();
        let input = if cfg.noise > 0.0 { corrupt(&clean, cfg.noise, &mut rng) } else { clean.clone() };
        let l = model.loss(&Tensor::from_slice(&input, &[cfg.batch_size, 784])?, &Tensor::from_slice(&clean, &[cfg.batch_size, 784])?)?;
        opt.step(&vs, &l.backward()?)?;
        trace.record(step, &l, &mut progress)?;
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    // The test images, corrupted once with a fixed seed for a denoising model.
    let test_input = if cfg.noise > 0.0 { corrupt(&test, cfg.noise, &mut Rng::new(cfg.seed ^ 0x7e57)) } else { test.clone() };
    let m = test.len() / 784;
    let (mut bce, mut mse, mut input_mse) = (0.0, 0.0, 0.0);
    let mut first_out = Vec::new();
    kiln_graph::no_grad(|| -> Result<()> {
        for from in (0..m).step_by(500) {
            let k = 500.min(m - from);
            let x = Tensor::from_slice(&test_input[from * 784..(from + k) * 784], &[k, 784])?;
            let t = Tensor::from_slice(&test[from * 784..(from + k) * 784], &[k, 784])?;
            let out = model.decode(&model.encode(&x)?)?;
            bce += kiln_graph::loss::bce_with_logits(&out, &t)?.to_scalar()? as f64 * k as f64;
            let probs = out.sigmoid()?.to_vec()?;
            for (j, p) in probs.iter().enumerate() {
                mse += ((p - test[from * 784 + j]) as f64).powi(2);
                input_mse += ((test_input[from * 784 + j] - test[from * 784 + j]) as f64).powi(2);
            }
            if from == 0 {
                first_out = probs[..8.min(k) * 784].to_vec();
            }
        }
        Ok(())
    })?;
    let pixels = (m * 784).max(1) as f64;
    let report = AeReport {
        kind: cfg.kind,
        noise: cfg.noise,
        steps: cfg.steps,
        first_loss: trace.first,
        last_loss: trace.last,
        test_bce: bce / m.max(1) as f64,
        test_mse: mse / pixels,
        input_mse: input_mse / pixels,
        ms_per_step,
        parameters: vs.num_values(),
    };
    let shown = 8.min(m) * 784;
    Ok((model, report, [test_input[..shown].to_vec(), first_out, test[..shown].to_vec()]))
}
