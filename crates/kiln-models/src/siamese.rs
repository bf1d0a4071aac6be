//! Face verification's recipe (siamese networks, the triplet loss) on Fashion-MNIST, scored on classes the
//! network never saw: train on seven classes, then tell "same or different" and do one-shot recognition on
//! the other three.
//!
//! One network with shared weights embeds every image (a siamese net is this network applied twice); the
//! embedding is L2-normalised, so distances lie in [0, 2]. Training batches hold K images of each of P
//! classes (Hermans et al. 2017's PK batches) and the loss is the triplet loss with batch-all, batch-hard or
//! semi-hard mining ([`kiln_nn::metric_learning`]), or the contrastive loss on each image paired with one
//! positive and one negative.
//!
//! Held-out scoring: the unseen classes' test images are split in half (seeded). On each half, seeded pairs,
//! half of one class, half of two: the ROC AUC of -distance; the threshold with the best accuracy on the dev
//! half, and its accuracy on the test half; and N-way one-shot accuracy on the test half (a query, one
//! support image of its class and one of each of N - 1 other classes; right when the nearest support is its
//! class). The same scores for the untrained network say how much training did. Training keeps the weights
//! with the best dev-half AUC: on unseen classes, longer training on seven classes can make matters worse.

use kiln_graph::kernels::BiasAct;
use kiln_graph::{KilnError, Pool2dGeom, Result, Rng, Tensor};
use kiln_nn::metric_learning::{batch_triplet_loss, best_threshold, roc_auc, Mining};
use kiln_nn::{BatchNorm, Conv2d, Conv2dConfig, Init, Layer, Linear, Module, Padding, Param, VarStore};

/// The embedding network's convolutional trunk: three stages of `convs_per_stage` 3x3 convolutions (each
/// followed by batch norm when asked, then ReLU) and a 2x2 max pooling.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Trunk {
    /// The three stages' channels.
    pub channels: [usize; 3],
    pub convs_per_stage: usize,
    pub batch_norm: bool,
}

impl Trunk {
    /// One convolution a stage, no batch norm (32, 64, 64 channels).
    pub const SMALL: Trunk = Trunk { channels: [32, 64, 64], convs_per_stage: 1, batch_norm: false };
    /// Two convolutions a stage with batch norm: the trunk that reached ROC AUC 0.90 on unseen classes in the
    /// PyTorch probe (scripts/siamese_torch_probe.py).
    pub const DEEP_BN: Trunk = Trunk { channels: [32, 64, 64], convs_per_stage: 2, batch_norm: true };
}

/// The embedding network: a [`Trunk`] (by default three 3x3 convolutions of 32, 64, 64 channels, ReLU, 2x2 max
/// pooling after each), a linear layer to `dim`, L2 normalisation. Input [n, 1, 28, 28]. Convolution k (in
/// order) is `features.{k}`, its batch norm `norms.{k}`. With batch norm, [`Module::set_training`] chooses
/// batch statistics (training steps) or the running ones (embedding for scores).
pub struct EmbeddingNet {
    pub convs: Vec<Conv2d>,
    /// One per convolution, or none.
    pub norms: Vec<BatchNorm>,
    pub convs_per_stage: usize,
    pub fc: Linear,
    pub dim: usize,
}

impl EmbeddingNet {
    /// The default trunk's channels.
    pub const CHANNELS: [usize; 3] = Trunk::SMALL.channels;

    pub fn new(vs: &mut VarStore, dim: usize) -> Result<EmbeddingNet> {
        Self::with_channels(vs, Self::CHANNELS, dim)
    }

    /// The net with `channels` in its three convolutions.
    pub fn with_channels(vs: &mut VarStore, channels: [usize; 3], dim: usize) -> Result<EmbeddingNet> {
        Self::with_trunk(vs, Trunk { channels, ..Trunk::SMALL }, dim)
    }

    /// The net on `trunk`.
    pub fn with_trunk(vs: &mut VarStore, trunk: Trunk, dim: usize) -> Result<EmbeddingNet> {
        let Trunk { channels, convs_per_stage, batch_norm } = trunk;
        if dim == 0 || channels.contains(&0) || !(1..=4).contains(&convs_per_stage) {
            return Err(KilnError::Usage(format!(
                "embedding net: the embedding size and the channels must be above 0, and 1 to 4 convolutions a stage (got {dim}, {channels:?} and {convs_per_stage})"
            )));
        }
        // With batch norm, PyTorch's default weight initialisation, U(+-1/sqrt(fan_in)), as in the probe: the weights'
        // scale sets batch norm's effective learning rate.
        let torch_default = |fan_in: usize| Init::Uniform { lo: -1.0 / (fan_in as f32).sqrt(), hi: 1.0 / (fan_in as f32).sqrt() };
        let (mut convs, mut norms) = (Vec::new(), Vec::new());
        let mut cin = 1;
        for &cout in &channels {
            for _ in 0..convs_per_stage {
                let k = convs.len();
                let init = if batch_norm { torch_default(9 * cin) } else { Conv2dConfig::default().init };
                let same = Conv2dConfig { padding: Padding::Same, init, ..Default::default() };
                convs.push(Conv2d::new(vs, &format!("features.{k}"), cin, cout, 3, same)?);
                if batch_norm {
                    norms.push(BatchNorm::new(vs, &format!("norms.{k}"), cout)?);
                }
                cin = cout;
            }
        }
        let fc = Linear::new(vs, "embedding", channels[2] * 3 * 3, dim, if batch_norm { torch_default(channels[2] * 3 * 3) } else { Init::XavierUniform })?;
        Ok(EmbeddingNet { convs, norms, convs_per_stage, fc, dim })
    }

    /// Batch norm's running means and variances, in order.
    pub fn running_stats(&self) -> Vec<&Param> {
        self.norms.iter().flat_map(|n| [&n.running_mean, &n.running_var]).collect()
    }

    /// Values per image of the trunk's features (the last convolution's channels x 3 x 3).
    pub fn feature_width(&self) -> usize {
        self.fc.in_features
    }

    /// The convolutional trunk: images [n, 1, 28, 28] -> features [n, channels x 3 x 3] (after the last pooling).
    fn trunk(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for (k, conv) in self.convs.iter().enumerate() {
            let pre = conv.forward(&x)?;
            x = match self.norms.get(k) {
                // Batch norm and ReLU in one kernel where the fused kernels apply (training).
                Some(bn) => match bn.forward_fused(&pre, BiasAct::Relu)? {
                    Some(y) => y,
                    None => bn.forward(&pre)?.relu()?,
                },
                None => pre.relu()?,
            };
            if (k + 1) % self.convs_per_stage == 0 {
                x = x.max_pool2d(Pool2dGeom::square(2))?.0;
            }
        }
        let n = x.shape()[0];
        x.reshape(&[n, self.feature_width()])
    }

    /// images [n, 1, 28, 28] -> unit embeddings [n, dim].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        unit_rows(&self.fc.forward(&self.trunk(images)?)?)
    }

    /// images [n, 1, 28, 28] -> the trunk's features before the projection, L2-normalised [n, feature_width].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        unit_rows(&self.trunk(images)?)
    }

    /// Values per image of `representation`.
    pub fn width(&self, representation: Representation) -> usize {
        match representation {
            Representation::Embedding => self.dim,
            Representation::Features => self.feature_width(),
        }
    }
}

/// Rows [n, d] divided by their L2 norms.
fn unit_rows(e: &Tensor) -> Result<Tensor> {
    let norm = e.mul(e)?.sum(&[1], true)?.add_scalar(1e-12)?.sqrt()?;
    e.broadcast_div(&norm)
}

/// What verification measures its distances on.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Representation {
    /// The normalised embedding the loss trains (the projection's output).
    Embedding,
    /// The trunk's features before the projection, normalised. The layer below a projection head trained with a
    /// metric loss transfers better to what the loss never saw (SimCLR, Chen et al. 2020): here the unseen
    /// classes.
    Features,
}

impl Representation {
    pub fn name(&self) -> &'static str {
        match self {
            Representation::Embedding => "embedding",
            Representation::Features => "features",
        }
    }
}

impl Module for EmbeddingNet {
    fn describe(&self) -> String {
        format!("EmbeddingNet(channels={:?}, batch_norm={}, dim={})", self.convs.iter().map(|c| c.weight.shape()[0]).collect::<Vec<_>>(), !self.norms.is_empty(), self.dim)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = self.convs.iter().enumerate().map(|(i, c)| (format!("features.{i}"), c as &dyn Module)).collect();
        v.extend(self.norms.iter().enumerate().map(|(i, n)| (format!("norms.{i}"), n as &dyn Module)));
        v.push(("embedding".into(), &self.fc));
        v
    }
    fn children_mut(&mut self) -> Vec<&mut dyn Module> {
        let mut v: Vec<&mut dyn Module> = self.convs.iter_mut().map(|c| c as &mut dyn Module).collect();
        v.extend(self.norms.iter_mut().map(|n| n as &mut dyn Module));
        v.push(&mut self.fc);
        v
    }
}

/// The loss a siamese run trains with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetricLoss {
    Triplet(Mining),
    Contrastive,
}

impl MetricLoss {
    pub fn name(&self) -> String {
        match self {
            MetricLoss::Triplet(m) => format!("triplet ({})", m.name()),
            MetricLoss::Contrastive => "contrastive".into(),
        }
    }
}

/// What a siamese run trains on and how it is scored.
#[derive(Clone, Debug)]
pub struct SiameseConfig {
    /// Fashion-MNIST classes kept out of training, scored at the end.
    pub held_out: Vec<u32>,
    pub dim: usize,
    /// The convolutional trunk: channels, convolutions a stage, batch norm.
    pub trunk: Trunk,
    pub loss: MetricLoss,
    pub margin: f32,
    pub steps: u64,
    /// K images of each training class per batch (all P = 10 - held-out classes are in every batch).
    pub per_class: usize,
    pub lr: f32,
    pub seed: u64,
    /// Pairs drawn on each half of the held-out images, and one-shot trials.
    pub pairs: usize,
    pub ways: usize,
    pub trials: usize,
    /// Every this many steps the dev half's ROC AUC is measured and the best weights kept (early stopping on
    /// the unseen classes' dev half; the test half is never looked at). 0: keep the last weights.
    pub eval_every: u64,
    /// GPU augmentation of each training batch (a fresh draw per step).
    pub augment: kiln_graph::Augment,
    /// Adam's L2 penalty on the weights (biases are not decayed).
    pub weight_decay: f32,
    /// What the unseen classes are scored on, early stopping included.
    pub representation: Representation,
    /// With batch norm in the trunk: score with statistics recomputed on the unseen classes' dev-half images
    /// ([`adapt_batch_norm`]; their labels unused), instead of the seen classes' running statistics. The
    /// default: with the seen classes' statistics, training never beat the untrained trunk on the dev half
    /// (docs/generative.md).
    pub adapt_batch_norm: bool,
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for SiameseConfig {
    fn default() -> Self {
        SiameseConfig {
            held_out: vec![7, 8, 9],
            dim: 128,
            trunk: Trunk::DEEP_BN,
            loss: MetricLoss::Triplet(Mining::All),
            margin: 0.2,
            steps: 300,
            per_class: 8,
            lr: 1e-3,
            seed: 42,
            pairs: 3000,
            ways: 3,
            trials: 2000,
            eval_every: 25,
            augment: kiln_graph::Augment::default(),
            weight_decay: 0.0,
            representation: Representation::Embedding,
            adapt_batch_norm: true,
            data_dir: None,
        }
    }
}

/// Verification and one-shot scores of one network on the held-out classes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VerificationScores {
    pub auc: f64,
    /// The distance below which a pair is called "same", chosen on the dev half.
    pub threshold: f64,
    pub dev_accuracy: f64,
    pub test_accuracy: f64,
    pub one_shot: f64,
}

/// What a siamese run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SiameseReport {
    pub loss: String,
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// What the scores were measured on: "embedding" or "features".
    pub representation: &'static str,
    pub trained: VerificationScores,
    pub untrained: VerificationScores,
    pub held_out: Vec<u32>,
    pub ways: usize,
    /// The step whose weights were kept (the best dev AUC), and that AUC.
    pub best_step: u64,
    pub best_dev_auc: f64,
    pub ms_per_step: f64,
    pub parameters: usize,
}

/// Images [n, 784] in [0, 1] and labels of the Fashion-MNIST classes `keep`.
fn select(set: &kiln_data::ArrayDataset, keep: &[u32]) -> Result<(Vec<f32>, Vec<u32>)> {
    let labels = match &set.targets {
        kiln_data::Targets::Classes { labels, .. } => labels,
        _ => return Err(KilnError::Data("fashion-mnist: expected class labels".into())),
    };
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (i, &l) in labels.iter().enumerate() {
        if keep.contains(&l) {
            x.extend_from_slice(&set.x[i * 784..(i + 1) * 784]);
            y.push(l);
        }
    }
    Ok((x, y))
}

/// The values of `params`, read back.
fn read_params(params: &[&Param]) -> Result<Vec<Vec<f32>>> {
    params.iter().map(|p| p.tensor()?.to_vec()).collect()
}

/// Writes `values` (as [`read_params`] gave them) into `params`.
fn write_params(params: &[&Param], values: &[Vec<f32>]) -> Result<()> {
    for (p, v) in params.iter().zip(values) {
        let t = p.tensor()?;
        t.device().write(t.storage(), bytemuck::cast_slice(v))?;
    }
    Ok(())
}

/// AdaBN (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation"): batch norm's
/// running statistics recomputed on `images` [n, 784] (no labels), the mean over batches of 256 of each
/// batch's statistics, layer by layer as the forward pass meets them. Leaves the net in evaluation mode.
pub fn adapt_batch_norm(net: &mut EmbeddingNet, images: &[f32]) -> Result<()> {
    let momenta: Vec<f32> = net.norms.iter().map(|n| n.momentum).collect();
    net.set_training(true);
    let n = images.len() / 784;
    for (b, from) in (0..n).step_by(256).enumerate() {
        // A running mean: batch b weighs 1 / (b + 1) against the b before it.
        for bn in &mut net.norms {
            bn.momentum = 1.0 / (b as f32 + 1.0);
        }
        let m = 256.min(n - from);
        let x = Tensor::from_slice(&images[from * 784..(from + m) * 784], &[m, 1, 28, 28])?;
        kiln_graph::no_grad(|| net.forward(&x))?;
    }
    for (bn, momentum) in net.norms.iter_mut().zip(momenta) {
        bn.momentum = momentum;
    }
    net.set_training(false);
    Ok(())
}

/// `representation` [n, net.width(representation)] of images [n, 784], in batches, without the tape.
pub fn embed(net: &EmbeddingNet, images: &[f32], representation: Representation) -> Result<Vec<f32>> {
    let n = images.len() / 784;
    let mut out = Vec::with_capacity(n * net.width(representation));
    for from in (0..n).step_by(256) {
        let m = 256.min(n - from);
        let x = Tensor::from_slice(&images[from * 784..(from + m) * 784], &[m, 1, 28, 28])?;
        let rows = kiln_graph::no_grad(|| match representation {
            Representation::Embedding => net.forward(&x),
            Representation::Features => net.features(&x),
        })?;
        out.extend(rows.to_vec()?);
    }
    Ok(out)
}

fn distance(e: &[f32], dim: usize, a: usize, b: usize) -> f64 {
    e[a * dim..(a + 1) * dim].iter().zip(&e[b * dim..(b + 1) * dim]).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt()
}

/// Seeded pairs among `members` (indices into the labels): `count / 2` of one class, the rest of two.
fn pairs(members: &[usize], labels: &[u32], count: usize, rng: &mut Rng) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let want_same = out.len() < count / 2;
        let a = members[rng.below(members.len())];
        let b = members[rng.below(members.len())];
        if a != b && (labels[a] == labels[b]) == want_same {
            out.push((a, b, want_same));
        }
    }
    out
}

/// The verification and one-shot scores of embeddings `e` [n, dim] of images with `labels`, split by `dev`
/// (true: the dev half).
pub fn verification_scores(e: &[f32], dim: usize, labels: &[u32], dev: &[bool], cfg: &SiameseConfig) -> Result<VerificationScores> {
    let mut rng = Rng::new(cfg.seed ^ 0x0ea1);
    let dev_members: Vec<usize> = (0..labels.len()).filter(|&i| dev[i]).collect();
    let test_members: Vec<usize> = (0..labels.len()).filter(|&i| !dev[i]).collect();
    // Same and different pairs both need two classes, one of them twice, in each half (else no pair exists).
    for (half, members) in [("dev", &dev_members), ("test", &test_members)] {
        let mut classes: Vec<u32> = members.iter().map(|&i| labels[i]).collect();
        classes.sort();
        let twice = classes.windows(2).any(|w| w[0] == w[1]);
        classes.dedup();
        if classes.len() < 2 || !twice {
            return Err(KilnError::Usage(format!(
                "verification: the {half} half needs two classes and a class seen twice to draw pairs from (it has {} images of {} classes)",
                members.len(),
                classes.len()
            )));
        }
    }
    let score = |ps: &[(usize, usize, bool)]| -> (Vec<f64>, Vec<bool>) { (ps.iter().map(|&(a, b, _)| -distance(e, dim, a, b)).collect(), ps.iter().map(|p| p.2).collect()) };
    let (dev_s, dev_y) = score(&pairs(&dev_members, labels, cfg.pairs, &mut rng));
    let (test_s, test_y) = score(&pairs(&test_members, labels, cfg.pairs, &mut rng));
    let (t, dev_accuracy) = best_threshold(&dev_s, &dev_y);
    let test_accuracy = test_s.iter().zip(&test_y).filter(|(s, y)| (**s >= t) == **y).count() as f64 / test_s.len().max(1) as f64;
    let auc = roc_auc(&test_s, &test_y).ok_or_else(|| KilnError::Usage("verification: the pairs need both same and different ones".into()))?;
    // N-way one-shot on the test half.
    let mut classes: Vec<u32> = cfg.held_out.clone();
    classes.sort();
    let by_class: Vec<Vec<usize>> = classes.iter().map(|c| test_members.iter().copied().filter(|&i| labels[i] == *c).collect()).collect();
    if cfg.ways < 2 || cfg.ways > classes.len() || by_class.iter().any(|m| m.len() < 2) {
        return Err(KilnError::Usage(format!("one-shot: {} ways need that many held-out classes (there are {}) with two test images each", cfg.ways, classes.len())));
    }
    let mut right = 0;
    for _ in 0..cfg.trials {
        let mut order: Vec<usize> = (0..classes.len()).collect();
        rng.shuffle(&mut order);
        let ways = &order[..cfg.ways];
        let truth = ways[0];
        let query = by_class[truth][rng.below(by_class[truth].len())];
        let supports: Vec<(usize, usize)> = ways
            .iter()
            .map(|&c| loop {
                let s = by_class[c][rng.below(by_class[c].len())];
                if s != query {
                    break (c, s);
                }
            })
            .collect();
        let best = supports.iter().min_by(|a, b| distance(e, dim, query, a.1).total_cmp(&distance(e, dim, query, b.1))).map(|s| s.0);
        right += (best == Some(truth)) as usize;
    }
    Ok(VerificationScores { auc, threshold: -t, dev_accuracy, test_accuracy, one_shot: right as f64 / cfg.trials.max(1) as f64 })
}

/// The ROC AUC of -distance on seeded pairs of the dev half (what early stopping watches).
fn dev_auc(e: &[f32], dim: usize, labels: &[u32], members: &[usize], pairs_count: usize, seed: u64) -> f64 {
    let ps = pairs(members, labels, pairs_count, &mut Rng::new(seed ^ 0xde7));
    let scores: Vec<f64> = ps.iter().map(|&(a, b, _)| -distance(e, dim, a, b)).collect();
    let same: Vec<bool> = ps.iter().map(|p| p.2).collect();
    roc_auc(&scores, &same).unwrap_or(0.5)
}

/// What a siamese run leaves for pictures: the held-out test images' embeddings and labels.
pub struct HeldOut {
    pub embeddings: Vec<f32>,
    pub labels: Vec<u32>,
    pub dim: usize,
}

/// Trains on the seven (10 - held-out) classes of Fashion-MNIST's training set with PK batches, keeping the
/// weights with the best ROC AUC on the unseen classes' dev half (measured every `eval_every` steps, the
/// untrained weights included), and scores the test half before and after.
pub fn train_siamese(cfg: &SiameseConfig, mut progress: impl FnMut(u64, f32)) -> Result<(EmbeddingNet, SiameseReport, HeldOut)> {
    let data_err = |e: kiln_data::DataError| KilnError::Data(e.to_string());
    let train_classes: Vec<u32> = (0..10).filter(|c| !cfg.held_out.contains(c)).collect();
    if train_classes.len() < 2 || cfg.held_out.len() < 2 || cfg.per_class < 2 || cfg.held_out.iter().any(|&c| c >= 10) {
        return Err(KilnError::Usage(format!(
            "siamese: needs at least two held-out classes below 10, leaving at least two to train on, and at least 2 images per class in a batch (held out {:?}, {} per class)",
            cfg.held_out, cfg.per_class
        )));
    }
    let (train_set, test_set) = kiln_data::load_fashion_mnist(cfg.data_dir.as_deref()).map_err(data_err)?;
    let (train_x, train_y) = select(&train_set, &train_classes)?;
    let (test_x, test_y) = select(&test_set, &cfg.held_out)?;
    let mut split_rng = Rng::new(cfg.seed ^ 0x5917);
    let dev: Vec<bool> = (0..test_y.len()).map(|_| split_rng.uniform() < 0.5).collect();

    let mut vs = VarStore::new(cfg.seed);
    let mut net = EmbeddingNet::with_trunk(&mut vs, cfg.trunk, cfg.dim)?;
    vs.finish()?;
    let (repr, width) = (cfg.representation, net.width(cfg.representation));
    // Scores embed with batch norm's running statistics (evaluation mode); steps train with the batch's.
    net.set_training(false);
    // Early stopping: the dev half's images (in order) and the best weights so far.
    let dev_idx: Vec<usize> = (0..test_y.len()).filter(|&i| dev[i]).collect();
    let dev_x: Vec<f32> = dev_idx.iter().flat_map(|&i| test_x[i * 784..(i + 1) * 784].iter().copied()).collect();
    let dev_y: Vec<u32> = dev_idx.iter().map(|&i| test_y[i]).collect();
    let dev_members: Vec<usize> = (0..dev_y.len()).collect();
    // With `adapt_batch_norm`, every score (untrained, early stopping, final) embeds with statistics recomputed
    // on the dev half's images; the training statistics are put back before the next step.
    let adapt = cfg.adapt_batch_norm && !net.norms.is_empty();
    let training_stats = read_params(&net.running_stats())?;
    if adapt {
        adapt_batch_norm(&mut net, &dev_x)?;
    }
    let untrained = verification_scores(&embed(&net, &test_x, repr)?, width, &test_y, &dev, cfg)?;
    let mut opt = crate::trainer::adam_cosine(&vs, cfg.lr, cfg.steps, None)?;
    opt.weight_decay = cfg.weight_decay;
    let by_class: Vec<Vec<usize>> = train_classes.iter().map(|c| (0..train_y.len()).filter(|&i| train_y[i] == *c).collect()).collect();
    let mut rng = Rng::new(cfg.seed);
    let snapshot = |vs: &VarStore| -> Result<Vec<Vec<f32>>> { read_params(&vs.params().collect::<Vec<_>>()) };
    let mut best = (0u64, dev_auc(&embed(&net, &dev_x, repr)?, width, &dev_y, &dev_members, cfg.pairs, cfg.seed), snapshot(&vs)?);
    write_params(&net.running_stats(), &training_stats)?;
    let started = std::time::Instant::now();
    let mut trace = crate::trainer::LossTrace::default();
    for step in 0..cfg.steps {
        let mut idx = Vec::with_capacity(by_class.len() * cfg.per_class);
        for members in &by_class {
            idx.extend((0..cfg.per_class).map(|_| members[rng.below(members.len())]));
        }
        let px: Vec<f32> = idx.iter().flat_map(|&i| train_x[i * 784..(i + 1) * 784].iter().copied()).collect();
        let labels: Vec<u32> = idx.iter().map(|&i| train_y[i]).collect();
        let images = Tensor::from_slice(&px, &[idx.len(), 1, 28, 28])?.augment(&cfg.augment, cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15))?;
        net.set_training(true);
        let e = net.forward(&images)?;
        net.set_training(false);
        let l = match cfg.loss {
            MetricLoss::Triplet(mining) => batch_triplet_loss(&e, &labels, cfg.margin, mining)?,
            MetricLoss::Contrastive => {
                // Each image with one random image of its class and one of another.
                let n = labels.len();
                let (mut left, mut right, mut same) = (Vec::new(), Vec::new(), Vec::new());
                for a in 0..n {
                    for want_same in [true, false] {
                        let b = loop {
                            let b = rng.below(n);
                            if b != a && (labels[a] == labels[b]) == want_same {
                                break b;
                            }
                        };
                        left.push(a as u32);
                        right.push(b as u32);
                        same.push(want_same as u8 as f32);
                    }
                }
                let pick = |v: &[u32]| -> Result<Tensor> { e.index_select(0, &Tensor::from_u32(v, &[v.len()])?) };
                kiln_graph::loss::contrastive_loss(&pick(&left)?, &pick(&right)?, &Tensor::from_slice(&same, &[same.len()])?, cfg.margin)?
            }
        };
        opt.step(&vs, &l.backward()?)?;
        trace.record(step, &l, &mut progress)?;
        if cfg.eval_every > 0 && ((step + 1) % cfg.eval_every == 0 || step + 1 == cfg.steps) {
            // The training statistics, kept while the dev half's stand in for the score.
            let kept = if adapt {
                let stats = read_params(&net.running_stats())?;
                adapt_batch_norm(&mut net, &dev_x)?;
                Some(stats)
            } else {
                None
            };
            let auc = dev_auc(&embed(&net, &dev_x, repr)?, width, &dev_y, &dev_members, cfg.pairs, cfg.seed);
            if auc > best.1 {
                best = (step + 1, auc, snapshot(&vs)?);
            }
            if let Some(stats) = kept {
                write_params(&net.running_stats(), &stats)?;
            }
        }
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    if cfg.eval_every > 0 {
        write_params(&vs.params().collect::<Vec<_>>(), &best.2)?;
    } else {
        best = (cfg.steps, f64::NAN, Vec::new());
        if adapt {
            adapt_batch_norm(&mut net, &dev_x)?;
        }
    }
    let embeddings = embed(&net, &test_x, repr)?;
    let trained = verification_scores(&embeddings, width, &test_y, &dev, cfg)?;
    let report = SiameseReport {
        loss: cfg.loss.name(),
        steps: cfg.steps,
        first_loss: trace.first,
        last_loss: trace.last,
        representation: repr.name(),
        trained,
        untrained,
        held_out: cfg.held_out.clone(),
        ways: cfg.ways,
        best_step: best.0,
        best_dev_auc: best.1,
        ms_per_step,
        parameters: vs.num_values(),
    };
    Ok((net, report, HeldOut { embeddings, labels: test_y, dim: width }))
}

/// Rows [n, dim] projected on their first two principal components (the covariance's top eigenvectors, from
/// `frechet::symmetric_eigen`).
pub fn pca_2d(rows: &[f32], dim: usize) -> Vec<(f32, f32)> {
    let n = rows.len() / dim.max(1);
    let (mean, cov) = crate::frechet::mean_and_covariance(rows, dim);
    let (values, vectors) = crate::frechet::symmetric_eigen(&cov, dim);
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let axis = |k: usize| -> Vec<f64> { order.get(k).map(|&c| (0..dim).map(|j| vectors[j * dim + c]).collect()).unwrap_or_else(|| vec![0.0; dim]) };
    let (first, second) = (axis(0), axis(1));
    (0..n)
        .map(|i| {
            let p = |c: &[f64]| (0..dim).map(|j| (rows[i * dim + j] as f64 - mean[j]) * c[j]).sum::<f64>() as f32;
            (p(&first), p(&second))
        })
        .collect()
}
