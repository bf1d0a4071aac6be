//! Neural style transfer (Gatys, Ecker & Bethge 2016): the pixels of an image optimised on the GPU so that its
//! features match a content image's at one layer and the Gram matrices of its features match a style image's
//! at several.
//!
//! - **Features**: any VGG-style network laid out as torchvision's `vgg16`/`vgg19` `features` (3x3
//!   convolutions `features.N.weight`/`.bias`, each followed by a ReLU at N + 1; a 2x2 max pooling wherever the
//!   next convolution's index jumps by 3). Layers are named as in the paper: `relu{block}_{k}`, `conv{block}_{k}`.
//!   [`VggFeatures::from_checkpoint`] reads a safetensors file of torchvision's names (a converted VGG-16/19
//!   gives the classic results); [`VggFeatures::random`] builds VGG-19's layout with seeded He-normal weights
//!   and fewer channels: random-feature texture synthesis and style transfer work (Ustyuzhaninov et al. 2016;
//!   He, Wang & Hopcroft 2016), which is what runs here, where no pretrained weights can be fetched.
//! - **Inputs** are normalised with ImageNet's mean and standard deviation, as torchvision's VGGs expect.
//! - **Losses** (the paper's): J_content = 1/2 sum (F - P)^2 at the content layer; per style layer
//!   E_l = sum (G - A)^2 / (4 N_l^2 M_l^2), G = F F^T the Gram matrix of its N_l maps of M_l pixels;
//!   J = alpha J_content + beta sum_l E_l / L + tv TV, TV the mean squared difference of neighbouring pixels.
//! - **Optimiser**: Adam on the pixels, or L-BFGS as the paper used (`kiln_nn::lbfgs`), from the content image or
//!   from uniform noise.

use std::collections::HashMap;
use std::path::Path;

use kiln_graph::{KilnError, Pool2dGeom, Result, Rng, Tensor};
use kiln_nn::{Conv2d, Conv2dConfig, Init, Layer, Padding, VarStore};

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// VGG-19's `features` channels, with "M" for pooling.
const VGG19: [usize; 21] = [64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0];

/// One step of a VGG `features` stack.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// torchvision index, paper name (`conv1_1`).
    Conv(usize, String),
    Relu(usize, String),
    Pool,
}

/// A VGG-style feature extractor.
pub struct VggFeatures {
    vs: VarStore,
    convs: HashMap<usize, Conv2d>,
    steps: Vec<Step>,
    /// Where the weights came from, said beside every picture.
    pub source: String,
}

fn layout(conv_indices: &[usize]) -> Vec<Step> {
    let (mut steps, mut block, mut k) = (Vec::new(), 1, 0);
    for (j, &i) in conv_indices.iter().enumerate() {
        k += 1;
        steps.push(Step::Conv(i, format!("conv{block}_{k}")));
        steps.push(Step::Relu(i + 1, format!("relu{block}_{k}")));
        if conv_indices.get(j + 1).is_some_and(|&next| next == i + 3) {
            steps.push(Step::Pool);
            block += 1;
            k = 0;
        }
    }
    steps
}

impl VggFeatures {
    /// VGG-19's layout with channels divided by `divisor` (at least 1 each), weights He-normal from `seed`.
    pub fn random(divisor: usize, seed: u64) -> Result<VggFeatures> {
        if divisor == 0 {
            return Err(KilnError::Usage("style: the channel divisor must be at least 1".into()));
        }
        let mut vs = VarStore::new(seed);
        let (mut convs, mut indices, mut index, mut c_in) = (HashMap::new(), Vec::new(), 0, 3);
        for &c in &VGG19 {
            if c == 0 {
                index += 1;
                continue;
            }
            let c_out = (c / divisor).max(1);
            let cfg = Conv2dConfig { padding: Padding::Same, init: Init::HeNormal, ..Default::default() };
            convs.insert(index, Conv2d::new(&mut vs, &format!("features.{index}"), c_in, c_out, 3, cfg)?);
            indices.push(index);
            c_in = c_out;
            index += 2;
        }
        vs.finish()?;
        Ok(VggFeatures { vs, convs, steps: layout(&indices), source: format!("VGG-19 layout, random He-normal weights (seed {seed}), channels / {divisor}") })
    }

    /// The convolutions of a safetensors checkpoint named as torchvision's VGG `features` (`features.N.weight`
    /// [out, in, 3, 3] and `features.N.bias`); other tensors (the classifier) are ignored. Errors name the file
    /// and what does not fit.
    pub fn from_checkpoint(path: &Path) -> Result<VggFeatures> {
        let ck = kiln_nn::checkpoint::load(path).map_err(|e| KilnError::Data(e.to_string()))?;
        let bad = |what: String| KilnError::Data(format!("{}: {what}", path.display()));
        let mut indices: Vec<usize> =
            ck.tensors.iter().filter_map(|t| t.name.strip_prefix("features.").and_then(|r| r.strip_suffix(".weight")).and_then(|i| i.parse().ok()).filter(|_| t.shape.len() == 4)).collect();
        indices.sort();
        if indices.is_empty() {
            return Err(bad("no convolution weights named features.N.weight [out, in, 3, 3]: not a torchvision VGG's features".into()));
        }
        if ck.tensors.iter().any(|t| t.name.contains("running_mean")) {
            return Err(bad("batch-norm VGGs (vgg16_bn, vgg19_bn) are not supported: give vgg16 or vgg19".into()));
        }
        let mut vs = VarStore::new(0);
        let (mut convs, mut c_in) = (HashMap::new(), 3);
        let mut values = Vec::new();
        for &i in &indices {
            let w = ck.get(&format!("features.{i}.weight")).ok_or_else(|| bad(format!("features.{i}.weight missing")))?;
            let b = ck.get(&format!("features.{i}.bias")).ok_or_else(|| bad(format!("features.{i}.bias missing")))?;
            if w.shape[1] != c_in || w.shape[2] != 3 || w.shape[3] != 3 || b.shape != [w.shape[0]] {
                return Err(bad(format!("features.{i}: weight {:?} and bias {:?} do not follow a 3x3 convolution from {c_in} channels", w.shape, b.shape)));
            }
            let cfg = Conv2dConfig { padding: Padding::Same, ..Default::default() };
            convs.insert(i, Conv2d::new(&mut vs, &format!("features.{i}"), c_in, w.shape[0], 3, cfg)?);
            values.push((format!("features.{i}.weight"), w.data.clone()));
            values.push((format!("features.{i}.bias"), b.data.clone()));
            c_in = w.shape[0];
        }
        vs.finish()?;
        for (name, data) in values {
            let p = vs.params().find(|p| p.name() == name).ok_or_else(|| bad(format!("{name} not built")))?;
            let t = p.tensor()?;
            t.device().write(t.storage(), bytemuck::cast_slice(&data))?;
        }
        Ok(VggFeatures { vs, convs, steps: layout(&indices), source: format!("{} ({} convolutions)", path.display(), indices.len()) })
    }

    /// The layer names this network has, in order (`conv1_1`, `relu1_1`, ...).
    pub fn layer_names(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv(_, n) | Step::Relu(_, n) => Some(n.clone()),
                Step::Pool => None,
            })
            .collect()
    }

    /// The convolution at torchvision index `index` of `features`, if there is one.
    pub fn conv(&self, index: usize) -> Option<&Conv2d> {
        self.convs.get(&index)
    }

    /// The parameters (for counting).
    pub fn parameters(&self) -> usize {
        self.vs.num_values()
    }

    /// The named layers' outputs for images [n, 3, h, w] in [0, 1] (normalised here), running only as far as
    /// the last one needed. An unknown name is an error listing the known ones.
    pub fn features(&self, images: &Tensor, layers: &[&str]) -> Result<HashMap<String, Tensor>> {
        let names = self.layer_names();
        if let Some(missing) = layers.iter().find(|l| !names.iter().any(|n| n == *l)) {
            return Err(KilnError::Usage(format!("style: this network has no layer {missing}; it has {}", names.join(", "))));
        }
        if images.rank() != 4 || images.shape()[1] != 3 {
            return Err(KilnError::Usage(format!("style: expects images [n, 3, h, w], got {:?}", images.shape())));
        }
        let dev = images.device();
        let mean = Tensor::from_slice_on(dev, &IMAGENET_MEAN, &[1, 3, 1, 1])?;
        let inv_std = Tensor::from_slice_on(dev, &IMAGENET_STD.map(|s| 1.0 / s), &[1, 3, 1, 1])?;
        let mut x = images.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;
        let mut out = HashMap::new();
        for step in &self.steps {
            if out.len() == layers.len() {
                break;
            }
            let name = match step {
                Step::Conv(i, n) => {
                    x = self.convs[i].forward(&x)?;
                    Some(n)
                }
                Step::Relu(_, n) => {
                    x = x.relu()?;
                    Some(n)
                }
                Step::Pool => {
                    if x.shape()[2] < 2 || x.shape()[3] < 2 {
                        return Err(KilnError::Usage(format!("style: the image is too small for this network: {:?} before a 2x2 pooling", x.shape())));
                    }
                    x = x.max_pool2d(Pool2dGeom::square(2))?.0;
                    None
                }
            };
            if let Some(n) = name.filter(|n| layers.contains(&n.as_str())) {
                out.insert(n.clone(), x.clone());
            }
        }
        Ok(out)
    }
}

/// Gram matrices [n, c, c] of features [n, c, h, w]: G = F F^T with F the [c, h w] maps (not normalised).
pub fn gram_matrix(features: &Tensor) -> Result<Tensor> {
    let s = features.shape();
    if s.len() != 4 {
        return Err(KilnError::Usage(format!("gram_matrix: expects features [n, c, h, w], got {s:?}")));
    }
    let f = features.reshape(&[s[0], s[1], s[2] * s[3]])?;
    f.matmul_t(&f, false, true)
}

/// Gatys et al.'s style loss of one layer: sum (G - A)^2 / (4 N^2 M^2) for features [1, N, h, w] (M = h w)
/// and a target Gram matrix A [1, N, N].
pub fn style_layer_loss(features: &Tensor, target_gram: &Tensor) -> Result<Tensor> {
    let s = features.shape();
    let g = gram_matrix(features)?;
    if g.shape() != target_gram.shape() {
        return Err(KilnError::Usage(format!("style_layer_loss: Gram matrix {:?} against a target of {:?}", g.shape(), target_gram.shape())));
    }
    let (n, m) = (s[1] as f32, (s[2] * s[3]) as f32);
    let d = g.sub(target_gram)?;
    d.mul(&d)?.sum_all()?.scale(1.0 / (4.0 * n * n * m * m))
}

/// The mean squared difference between neighbouring pixels of images [n, c, h, w], both ways.
pub fn total_variation(x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    let dy = x.slice(2, 1, s[2] - 1)?.sub(&x.slice(2, 0, s[2] - 1)?)?;
    let dx = x.slice(3, 1, s[3] - 1)?.sub(&x.slice(3, 0, s[3] - 1)?)?;
    dy.mul(&dy)?.mean_all()?.add(&dx.mul(&dx)?.mean_all()?)
}

/// A style transfer's settings.
#[derive(Clone, Debug)]
pub struct StyleConfig {
    pub content_layer: String,
    pub style_layers: Vec<String>,
    pub content_weight: f32,
    pub style_weight: f32,
    pub tv_weight: f32,
    pub steps: u64,
    pub lr: f32,
    /// Start from the content image (else from uniform noise).
    pub from_content: bool,
    pub seed: u64,
    /// Adam (each step one forward and backward), or L-BFGS as the paper used (`kiln_nn::lbfgs`, PyTorch's
    /// rules, a history of 100; each step one evaluation of the loss and its gradient, `lr` its step size:
    /// 1 is usual).
    pub optimizer: StyleOptimizer,
}

/// How the pixels are optimised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum StyleOptimizer {
    Adam,
    Lbfgs,
}

impl std::str::FromStr for StyleOptimizer {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "adam" => Ok(StyleOptimizer::Adam),
            "lbfgs" => Ok(StyleOptimizer::Lbfgs),
            _ => Err(format!("unknown style optimizer {s:?} (adam, lbfgs)")),
        }
    }
}

impl Default for StyleConfig {
    fn default() -> Self {
        StyleConfig {
            content_layer: "relu4_2".into(),
            style_layers: ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"].map(String::from).to_vec(),
            content_weight: 1.0,
            style_weight: 1e7,
            tv_weight: 1.0,
            steps: 200,
            lr: 0.03,
            from_content: true,
            seed: 42,
            optimizer: StyleOptimizer::Adam,
        }
    }
}

/// The loss terms of one step (weighted as in the total).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StyleTerms {
    pub content: f64,
    pub style: f64,
    pub tv: f64,
}

/// What a style transfer measured: the first and last steps' terms, the time per step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StyleReport {
    pub first: StyleTerms,
    pub last: StyleTerms,
    pub steps: u64,
    pub ms_per_step: f64,
    pub features: String,
}

/// Optimises the pixels of an image [3, h, w] (the content's size) for the content and style pictures
/// ([3, h, w] each, any sizes the network can pool) and returns them clamped to [0, 1] with the report.
pub fn transfer(
    net: &VggFeatures,
    content: &kiln_data::picture::Picture,
    style: &kiln_data::picture::Picture,
    cfg: &StyleConfig,
    mut progress: impl FnMut(u64, StyleTerms),
) -> Result<(kiln_data::picture::Picture, StyleReport)> {
    let style_names: Vec<&str> = cfg.style_layers.iter().map(String::as_str).collect();
    if style_names.is_empty() {
        return Err(KilnError::Usage("style: at least one style layer is needed".into()));
    }
    let content_t = Tensor::from_slice(&content.pixels, &[1, 3, content.h, content.w])?;
    let style_t = Tensor::from_slice(&style.pixels, &[1, 3, style.h, style.w])?;
    let (target_content, target_grams) = kiln_graph::no_grad(|| -> Result<(Tensor, Vec<Tensor>)> {
        let c = net.features(&content_t, &[cfg.content_layer.as_str()])?.remove(&cfg.content_layer).ok_or_else(|| KilnError::Usage("style: no content layer".into()))?;
        let s = net.features(&style_t, &style_names)?;
        let grams = style_names.iter().map(|n| gram_matrix(&s[*n])).collect::<Result<Vec<_>>>()?;
        Ok((c, grams))
    })?;
    let mut vs = VarStore::new(cfg.seed);
    let start: Vec<f32> = if cfg.from_content {
        content.pixels.clone()
    } else {
        let mut rng = Rng::new(cfg.seed);
        (0..content.pixels.len()).map(|_| rng.uniform() as f32).collect()
    };
    let image = vs.param("image", &[1, 3, content.h, content.w], Init::Zeros, false)?;
    vs.finish()?;
    let t = image.tensor()?;
    t.device().write(t.storage(), bytemuck::cast_slice(&start))?;
    let mut opt = kiln_nn::Optimizer::new(
        &vs,
        kiln_nn::OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        cfg.lr,
        0.0,
        kiln_nn::schedule::Schedule { kind: kiln_nn::schedule::LrSchedule::Constant, warmup: 0 },
        cfg.steps.max(1),
    )?;
    let mut wanted: Vec<&str> = style_names.clone();
    wanted.push(cfg.content_layer.as_str());
    wanted.dedup();
    let started = std::time::Instant::now();
    let (mut first, mut last) = (StyleTerms::default(), StyleTerms::default());
    // J at the image's current pixels: (the total, its terms).
    let objective = |x: &Tensor| -> Result<(Tensor, StyleTerms)> {
        let feats = net.features(x, &wanted)?;
        let d = feats[&cfg.content_layer].sub(&target_content)?;
        let content_loss = d.mul(&d)?.sum_all()?.scale(0.5 * cfg.content_weight)?;
        let mut style_loss = style_layer_loss(&feats[style_names[0]], &target_grams[0])?;
        for (n, g) in style_names.iter().zip(&target_grams).skip(1) {
            style_loss = style_loss.add(&style_layer_loss(&feats[*n], g)?)?;
        }
        let style_loss = style_loss.scale(cfg.style_weight / style_names.len() as f32)?;
        let tv = total_variation(x)?.scale(cfg.tv_weight)?;
        let total = content_loss.add(&style_loss)?.add(&tv)?;
        let terms = StyleTerms { content: content_loss.to_scalar()? as f64, style: style_loss.to_scalar()? as f64, tv: tv.to_scalar()? as f64 };
        Ok((total, terms))
    };
    match cfg.optimizer {
        StyleOptimizer::Adam => {
            for step in 0..cfg.steps {
                let (total, terms) = objective(image.tensor()?)?;
                opt.step(&vs, &total.backward()?)?;
                if step == 0 {
                    first = terms;
                }
                last = terms;
                progress(step + 1, terms);
            }
        }
        StyleOptimizer::Lbfgs => {
            // One iteration a call: each step evaluates J and its gradient once, as an Adam step does.
            let mut lbfgs = kiln_nn::lbfgs::Lbfgs::with(cfg.lr, 1, 100);
            let mut pixels = start.clone();
            let x = image.tensor()?;
            for step in 0..cfg.steps {
                lbfgs.step(&mut pixels, |p| {
                    x.device().write(x.storage(), bytemuck::cast_slice(p))?;
                    let (total, terms) = objective(x)?;
                    let grads = total.backward()?;
                    let g = grads.get(x).ok_or_else(|| KilnError::Usage("style: the image got no gradient".into()))?.to_vec()?;
                    if step == 0 {
                        first = terms;
                    }
                    last = terms;
                    Ok((total.to_scalar()?, g))
                })?;
                progress(step + 1, last);
            }
            x.device().write(x.storage(), bytemuck::cast_slice(&pixels))?;
        }
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    let pixels = image.tensor()?.to_vec()?.into_iter().map(|v| v.clamp(0.0, 1.0)).collect();
    let out = kiln_data::picture::Picture { pixels, h: content.h, w: content.w };
    Ok((out, StyleReport { first, last, steps: cfg.steps, ms_per_step, features: net.source.clone() }))
}
