//! Semantic segmentation on the object scenes (kiln_data::ObjectScenes): per-pixel classes (0 background,
//! class + 1 for an object) with three decoders over one encoder, so they compare like for like.
//!
//! The encoder: `depth` stages of two 3x3 convolutions (ReLU) and a 2x2 max pooling, channels doubling from
//! `width`. Then a 3x3 convolution at the bottom. Then:
//! - **FCN** without skips (Long et al.'s FCN-32s; FCN-16s and -8s add the skips): a 1x1 convolution scores
//!   the classes at the bottom, at 1 / 2^depth of the image's side, and fixed bilinear upsampling by 2^depth
//!   brings the scores to the image's size, as the paper's last upsampling layer;
//! - **SegNet**: `depth` times, max-unpooling with the encoder's own pooling switches, then two 3x3
//!   convolutions;
//! - **U-Net**: `depth` times, a 2x2 transposed convolution (stride 2), the encoder stage's features
//!   concatenated (the skip), then two 3x3 convolutions.
//!
//! With `batch_norm` (the default), every 3x3 convolution is followed by batch norm (U-Net's and SegNet's
//! papers' form; `{name}.bn`) and has no bias of its own. A 1x1 convolution gives the class logits (SegNet's
//! and U-Net's at full size); the loss is the per-pixel cross-entropy.

use kiln_graph::kernels::BiasAct;
use kiln_graph::{Pool2dGeom, Result, Tensor};
use kiln_nn::{BatchNorm, Conv2d, Conv2dConfig, ConvTranspose2d, Layer, Module, Padding, Param, VarStore};

/// Which decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Decoder {
    Fcn,
    SegNet,
    UNet,
}

impl Decoder {
    pub fn name(&self) -> &'static str {
        match self {
            Decoder::Fcn => "fcn",
            Decoder::SegNet => "segnet",
            Decoder::UNet => "unet",
        }
    }
}

/// A 3x3 convolution ("same" padding) and ReLU, with batch norm between them when built with it (the
/// segmenters' and YOLO's backbone layer).
pub struct ConvBlock {
    pub conv: Conv2d,
    pub bn: Option<BatchNorm>,
}

impl ConvBlock {
    /// The convolution's parameters are `{name}.weight` (and `{name}.bias` without batch norm), batch norm's
    /// `{name}.bn.*`.
    pub fn new(vs: &mut VarStore, name: &str, c_in: usize, c_out: usize, batch_norm: bool) -> Result<ConvBlock> {
        let cfg = Conv2dConfig { padding: Padding::Same, bias: !batch_norm, ..Default::default() };
        let conv = Conv2d::new(vs, name, c_in, c_out, 3, cfg)?;
        let bn = if batch_norm { Some(BatchNorm::new(vs, &format!("{name}.bn"), c_out)?) } else { None };
        Ok(ConvBlock { conv, bn })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pre = self.conv.forward(x)?;
        match &self.bn {
            // Batch norm and ReLU in one kernel where the fused kernels apply (training).
            Some(bn) => match bn.forward_fused(&pre, BiasAct::Relu)? {
                Some(y) => Ok(y),
                None => bn.forward(&pre)?.relu(),
            },
            None => pre.relu(),
        }
    }
}

impl Module for ConvBlock {
    fn describe(&self) -> String {
        format!("{}{}", self.conv.describe(), if self.bn.is_some() { " + BatchNorm" } else { "" })
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("conv".into(), &self.conv)];
        if let Some(bn) = &self.bn {
            v.push(("bn".into(), bn));
        }
        v
    }
    fn children_mut(&mut self) -> Vec<&mut dyn Module> {
        let mut v: Vec<&mut dyn Module> = vec![&mut self.conv];
        if let Some(bn) = &mut self.bn {
            v.push(bn);
        }
        v
    }
}

/// The network (names `enc.{i}.{0,1}`, `bottom`, `dec.{i}.{0,1}`, `up.{i}` (U-Net), `out`; batch norms
/// `{conv}.bn`).
pub struct SegmentNet {
    pub decoder: Decoder,
    pub enc: Vec<[ConvBlock; 2]>,
    pub bottom: ConvBlock,
    pub up: Vec<ConvTranspose2d>,
    pub dec: Vec<Vec<ConvBlock>>,
    pub out: Conv2d,
}

impl SegmentNet {
    pub fn new(vs: &mut VarStore, decoder: Decoder, classes: usize, width: usize, depth: usize, batch_norm: bool) -> Result<SegmentNet> {
        let ch = |i: usize| width << i;
        let block = |vs: &mut VarStore, name: String, c_in: usize, c_out: usize| ConvBlock::new(vs, &name, c_in, c_out, batch_norm);
        let mut enc = Vec::new();
        let mut c_in = 3;
        for i in 0..depth {
            enc.push([block(vs, format!("enc.{i}.0"), c_in, ch(i))?, block(vs, format!("enc.{i}.1"), ch(i), ch(i))?]);
            c_in = ch(i);
        }
        let bottom = block(vs, "bottom".into(), ch(depth - 1), ch(depth - 1))?;
        let (mut up, mut dec) = (Vec::new(), Vec::new());
        // Decoder stage i (deepest first) ends with ch(i - 1) channels (width at the top). The FCN has none.
        for i in (0..depth).rev().filter(|_| decoder != Decoder::Fcn) {
            let out_c = if i == 0 { width } else { ch(i - 1) };
            let convs = match decoder {
                // (The FCN is filtered out above.)
                Decoder::Fcn | Decoder::SegNet => vec![block(vs, format!("dec.{i}.0"), ch(i), ch(i))?, block(vs, format!("dec.{i}.1"), ch(i), out_c)?],
                Decoder::UNet => {
                    up.push(ConvTranspose2d::new(vs, &format!("up.{i}"), ch(i), ch(i), 2, 2, 0, 0, 1, true)?);
                    vec![block(vs, format!("dec.{i}.0"), 2 * ch(i), ch(i))?, block(vs, format!("dec.{i}.1"), ch(i), out_c)?]
                }
            };
            dec.push(convs);
        }
        let scored = if decoder == Decoder::Fcn { ch(depth - 1) } else { width };
        let out = Conv2d::new(vs, "out", scored, classes, 1, Conv2dConfig::default())?;
        Ok(SegmentNet { decoder, enc, bottom, up, dec, out })
    }

    /// Whether its convolutions have batch norm.
    pub fn batch_norm(&self) -> bool {
        self.bottom.bn.is_some()
    }

    /// images [n, 3, h, w] (h and w divisible by 2^depth) -> logits [n, classes, h, w].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        let (mut skips, mut switches, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        for [a, b] in &self.enc {
            x = b.forward(&a.forward(&x)?)?;
            skips.push(x.clone());
            sizes.push([x.shape()[2], x.shape()[3]]);
            let (pooled, idx) = x.max_pool2d(Pool2dGeom::square(2))?;
            switches.push(idx);
            x = pooled;
        }
        x = self.bottom.forward(&x)?;
        if self.decoder == Decoder::Fcn {
            let full = [images.shape()[2], images.shape()[3]];
            return self.out.forward(&x)?.upsample_bilinear2d(full, false);
        }
        for (j, convs) in self.dec.iter().enumerate() {
            let i = self.enc.len() - 1 - j;
            x = match self.decoder {
                // (The FCN returned above.)
                Decoder::Fcn | Decoder::SegNet => x.max_unpool2d(&switches[i], Pool2dGeom::square(2), sizes[i])?,
                Decoder::UNet => Tensor::concat(&[&self.up[j].forward(&x)?.relu()?, &skips[i]], 1)?,
            };
            for conv in convs {
                x = conv.forward(&x)?;
            }
        }
        self.out.forward(&x)
    }
}

impl Module for SegmentNet {
    fn describe(&self) -> String {
        format!("SegmentNet({}, depth {})", self.decoder.name(), self.enc.len())
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = Vec::new();
        for (i, [a, b]) in self.enc.iter().enumerate() {
            v.push((format!("enc.{i}.0"), a));
            v.push((format!("enc.{i}.1"), b));
        }
        v.push(("bottom".into(), &self.bottom));
        let depth = self.enc.len();
        for (j, convs) in self.dec.iter().enumerate() {
            let i = depth - 1 - j;
            if let Some(u) = self.up.get(j) {
                v.push((format!("up.{i}"), u));
            }
            for (k, c) in convs.iter().enumerate() {
                v.push((format!("dec.{i}.{k}"), c));
            }
        }
        v.push(("out".into(), &self.out));
        v
    }
    fn children_mut(&mut self) -> Vec<&mut dyn Module> {
        // The order of `children`.
        let mut v: Vec<&mut dyn Module> = Vec::new();
        for [a, b] in &mut self.enc {
            v.push(a);
            v.push(b);
        }
        v.push(&mut self.bottom);
        let mut up = self.up.iter_mut();
        for convs in &mut self.dec {
            if let Some(u) = up.next() {
                v.push(u);
            }
            v.extend(convs.iter_mut().map(|c| c as &mut dyn Module));
        }
        v.push(&mut self.out);
        v
    }
}

/// What a segmentation run trains on.
#[derive(Clone, Debug)]
pub struct SegmentConfig {
    pub decoder: Decoder,
    pub scenes: kiln_data::ObjectSceneConfig,
    pub width: usize,
    pub depth: usize,
    /// Batch norm after every 3x3 convolution.
    pub batch_norm: bool,
    /// Weight the loss's classes by median frequency balancing (SegNet's, Eigen & Fergus 2015), counted on
    /// the first 500 training scenes: an object class's pixels then count as much as the background's.
    pub median_frequency: bool,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub seed: u64,
    pub test_scenes: usize,
    pub data_dir: Option<std::path::PathBuf>,
    /// Where to write `segment.safetensors` (weights, decoder, sizes and class names) after training, for
    /// `kiln segment` and [`load_segmentation`].
    pub out_dir: Option<std::path::PathBuf>,
    /// Every this many steps (0: never), [`segment_pictures`] of four held-out scenes into `out_dir` as
    /// `scenes-step-NNNNNN.png`, drawn with batch norm's running statistics.
    pub sample_every: u64,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            decoder: Decoder::UNet,
            scenes: Default::default(),
            width: 16,
            depth: 3,
            batch_norm: true,
            median_frequency: true,
            batch_size: 8,
            steps: 3000,
            lr: 2e-3,
            seed: 42,
            test_scenes: 100,
            data_dir: None,
            out_dir: None,
            sample_every: 0,
        }
    }
}

/// What a segmentation checkpoint says besides its weights.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    /// The side of the square scenes it was trained on (pictures are resized to it).
    pub size: usize,
    /// The object classes (class c of the net's output is object class c - 1; 0 is the background).
    pub class_names: Vec<String>,
}

/// Writes a trained net's weights with what rebuilds it in the metadata, atomically.
pub fn save_segmentation(path: &std::path::Path, vs: &VarStore, cfg: &SegmentConfig, info: &SegmentInfo) -> Result<()> {
    let mut ck = vs.to_checkpoint()?;
    for (k, v) in [
        ("kiln.model", "segment".to_string()),
        ("kiln.decoder", cfg.decoder.name().to_string()),
        ("kiln.width", cfg.width.to_string()),
        ("kiln.depth", cfg.depth.to_string()),
        ("kiln.batch_norm", cfg.batch_norm.to_string()),
        ("kiln.size", info.size.to_string()),
        ("kiln.class_names", info.class_names.join("|")),
    ] {
        ck.metadata.insert(k.into(), v);
    }
    kiln_nn::checkpoint::save(path, &ck).map_err(|e| kiln_graph::KilnError::Checkpoint(e.to_string()))
}

/// A net written by [`save_segmentation`] (`kiln train segment` writes one), on the current device. A file
/// that is not such a checkpoint names the file and what is missing.
pub fn load_segmentation(path: &std::path::Path) -> Result<(SegmentNet, SegmentInfo)> {
    let saved = crate::saved::SavedModel::open(path, "segment", "a segmentation checkpoint of `kiln train segment`")?;
    let decoder = match saved.meta("kiln.decoder")?.as_str() {
        "fcn" => Decoder::Fcn,
        "segnet" => Decoder::SegNet,
        "unet" => Decoder::UNet,
        other => return Err(saved.bad(&format!("unknown decoder {other:?}"))),
    };
    let class_names: Vec<String> = saved.meta("kiln.class_names")?.split('|').map(str::to_string).collect();
    // Checkpoints from before batch norm was an option have none.
    let batch_norm = saved.flag("kiln.batch_norm")?;
    let mut vs = VarStore::new(0);
    let mut net = SegmentNet::new(&mut vs, decoder, class_names.len() + 1, saved.number("kiln.width")?, saved.number("kiln.depth")?, batch_norm)?;
    vs.finish()?;
    saved.load_into(&vs)?;
    net.set_training(false);
    Ok((net, SegmentInfo { size: saved.number("kiln.size")?, class_names }))
}

/// What a segmentation run measured on held-out scenes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SegmentReport {
    pub decoder: Decoder,
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub pixel_accuracy: f64,
    pub miou: f64,
    pub parameters: usize,
    pub ms_per_step: f64,
    /// The loss's class weights (background first; empty without median frequency balancing).
    pub class_weights: Vec<f32>,
}

/// Median frequency balancing (Eigen & Fergus 2015, SegNet's loss): a class's frequency is its pixels over the
/// labelled pixels of the images it appears in, and its weight the median of those frequencies over this one's.
/// Classes in none of the maps get weight 1. `maps`: per-pixel labels of whole images; labels at or above
/// `classes` (an `ignore_index`, say) are not counted.
pub fn median_frequency_weights<'a>(maps: impl IntoIterator<Item = &'a [u32]>, classes: usize) -> Vec<f32> {
    let (mut pixels, mut present_in) = (vec![0f64; classes], vec![0f64; classes]);
    for map in maps {
        let mut here = vec![0f64; classes];
        for &c in map {
            if let Some(n) = here.get_mut(c as usize) {
                *n += 1.0;
            }
        }
        let labelled: f64 = here.iter().sum();
        for c in 0..classes {
            if here[c] > 0.0 {
                pixels[c] += here[c];
                present_in[c] += labelled;
            }
        }
    }
    let freq: Vec<Option<f64>> = (0..classes).map(|c| (present_in[c] > 0.0).then(|| pixels[c] / present_in[c])).collect();
    let mut seen: Vec<f64> = freq.iter().flatten().copied().collect();
    seen.sort_by(f64::total_cmp);
    let median = match seen.len() {
        0 => return vec![1.0; classes],
        n if n % 2 == 1 => seen[n / 2],
        n => (seen[n / 2 - 1] + seen[n / 2]) / 2.0,
    };
    freq.iter().map(|f| f.map_or(1.0, |f| (median / f) as f32)).collect()
}

/// Trains on fresh training scenes with the per-pixel cross-entropy and scores pixel accuracy and mIoU (over
/// the classes present, background included) on held-out scenes.
pub fn train_segmentation(cfg: &SegmentConfig, mut progress: impl FnMut(u64, f32)) -> Result<(SegmentNet, SegmentReport)> {
    use kiln_data::{ObjectScenes, ObjectSplit};
    let data_err = |e: kiln_data::DataError| kiln_graph::KilnError::Data(e.to_string());
    let (s, m) = (cfg.scenes.size, 1usize << cfg.depth);
    if cfg.batch_size == 0 || cfg.depth == 0 || !s.is_multiple_of(m) {
        return Err(kiln_graph::KilnError::Usage(format!("segmentation: a batch above 0, depth above 0 and a scene size divisible by 2^depth = {m} are needed (size {s})")));
    }
    let train = ObjectScenes::new(cfg.scenes, ObjectSplit::Train, cfg.seed, (cfg.steps as usize * cfg.batch_size).max(1), cfg.data_dir.as_deref()).map_err(data_err)?;
    let test = ObjectScenes::new(cfg.scenes, ObjectSplit::Test, cfg.seed, cfg.test_scenes, cfg.data_dir.as_deref()).map_err(data_err)?;
    let classes = train.classes() + 1;
    let mut vs = VarStore::new(cfg.seed);
    let mut net = SegmentNet::new(&mut vs, cfg.decoder, classes, cfg.width, cfg.depth, cfg.batch_norm)?;
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, cfg.lr, cfg.steps, None)?;
    let class_weights = if cfg.median_frequency {
        let maps = (0..train.len.min(500)).map(|i| train.scene(i).map(|sc| sc.semantic)).collect::<std::result::Result<Vec<_>, _>>().map_err(data_err)?;
        median_frequency_weights(maps.iter().map(Vec::as_slice), classes)
    } else {
        Vec::new()
    };
    let weight = if class_weights.is_empty() { None } else { Some(Tensor::from_slice(&class_weights, &[classes])?) };
    let batch = |set: &ObjectScenes, from: usize, n: usize| -> Result<(Tensor, Vec<u32>)> {
        let (px, scenes) = set.batch(from, n).map_err(data_err)?;
        Ok((Tensor::from_slice(&px, &[n, 3, s, s])?, scenes.iter().flat_map(|sc| sc.semantic.iter().copied()).collect()))
    };
    let started = std::time::Instant::now();
    let mut trace = crate::trainer::LossTrace::default();
    for step in 0..cfg.steps {
        let (x, labels) = batch(&train, step as usize * cfg.batch_size, cfg.batch_size)?;
        let y = Tensor::from_u32(&labels, &[cfg.batch_size, s, s])?;
        let l = kiln_graph::loss::pixel_cross_entropy(&net.forward(&x)?, &y, weight.as_ref(), Default::default())?;
        opt.step(&vs, &l.backward()?)?;
        trace.record(step, &l, &mut progress)?;
        if let Some(path) = crate::trainer::sample_picture_path(cfg.out_dir.as_deref(), cfg.sample_every, step + 1)? {
            net.set_training(false);
            segment_pictures(&net, cfg, 4, &path)?;
            net.set_training(true);
        }
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    // Scored, saved and drawn with batch norm's running statistics.
    net.set_training(false);
    let mut confusion = vec![vec![0u64; classes]; classes];
    for from in (0..test.len).step_by(cfg.batch_size) {
        let n = cfg.batch_size.min(test.len - from);
        let (x, labels) = batch(&test, from, n)?;
        let logits = kiln_graph::no_grad(|| net.forward(&x))?.to_vec()?;
        for (p, &truth) in labels.iter().enumerate() {
            let (img, pix) = (p / (s * s), p % (s * s));
            let class = (0..classes).max_by(|&a, &b| logits[(img * classes + a) * s * s + pix].total_cmp(&logits[(img * classes + b) * s * s + pix])).unwrap_or(0);
            confusion[truth as usize][class] += 1;
        }
    }
    let (pixel_accuracy, _, miou) = kiln_nn::detection_metrics::segmentation_scores(&confusion);
    if let Some(dir) = &cfg.out_dir {
        std::fs::create_dir_all(dir).map_err(|e| kiln_graph::KilnError::Io { path: dir.display().to_string(), message: e.to_string() })?;
        save_segmentation(&dir.join("segment.safetensors"), &vs, cfg, &SegmentInfo { size: s, class_names: cfg.scenes.source.class_names() })?;
    }
    Ok((net, SegmentReport { decoder: cfg.decoder, steps: cfg.steps, first_loss: trace.first, last_loss: trace.last, pixel_accuracy, miou, parameters: vs.num_values(), ms_per_step, class_weights }))
}

/// A PNG of the first `count` held-out scenes of a run, each twice: the true class map, then the predicted
/// one, each class tinted in its colour (class numbers as in `ObjectSource::class_names`).
pub fn segment_pictures(net: &SegmentNet, cfg: &SegmentConfig, count: usize, path: &std::path::Path) -> Result<()> {
    let data_err = |e: kiln_data::DataError| kiln_graph::KilnError::Data(e.to_string());
    let test = kiln_data::ObjectScenes::new(cfg.scenes, kiln_data::ObjectSplit::Test, cfg.seed, count, cfg.data_dir.as_deref()).map_err(data_err)?;
    let s = cfg.scenes.size;
    let (px, scenes) = test.batch(0, count).map_err(data_err)?;
    let logits = kiln_graph::no_grad(|| net.forward(&Tensor::from_slice(&px, &[count, 3, s, s])?))?;
    let classes = logits.shape()[1];
    let logits = logits.to_vec()?;
    // Per scene and class: the pixels of that class (0/1), truth then prediction.
    let maps = |labels: &dyn Fn(usize) -> usize| -> Vec<(u32, Vec<u8>)> {
        (1..classes).map(|c| (c as u32 - 1, (0..s * s).map(|p| (labels(p) == c) as u8).collect::<Vec<u8>>())).filter(|(_, m)| m.contains(&1)).collect()
    };
    let mut layers = Vec::new();
    for (i, sc) in scenes.iter().enumerate() {
        let truth = maps(&|p| sc.semantic[p] as usize);
        let pred = maps(&|p| (0..classes).max_by(|&a, &b| logits[(i * classes + a) * s * s + p].total_cmp(&logits[(i * classes + b) * s * s + p])).unwrap_or(0));
        layers.push((i, truth));
        layers.push((i, pred));
    }
    let panels: Vec<(&[f32], Vec<crate::plot::Overlay>)> =
        layers.iter().map(|(i, ms)| (&scenes[*i].image[..], ms.iter().map(|(c, m)| crate::plot::Overlay { bbox: None, class: *c, mask: Some(&m[..]) }).collect())).collect();
    crate::plot::scenes_png(path, s, (256 / s).max(1), &panels).map_err(|e| kiln_graph::KilnError::Data(format!("writing {}: {e}", path.display())))
}
