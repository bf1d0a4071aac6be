//! Classification with localisation, the course's first step towards detection: an image holds one object or
//! none, and the network outputs, in the course's notation, y = [p_c, b_x, b_y, b_h, b_w, c_1 .. c_K]: whether
//! there is an object, its box (centre b_x, b_y and size b_h, b_w, each a fraction of the image side, (0, 0)
//! the top-left corner) and its class.
//!
//! Two losses:
//! - [`LocalizationLoss::Squared`], the course's: with an object (y_1 = 1) the squared error summed over all
//!   5 + K outputs, without one (y_1 = 0) only (yhat_1 - y_1)^2; averaged over the images;
//! - [`LocalizationLoss::Mixed`], what the course says is used in practice (the default): the logistic loss of
//!   p_c on every image, and on the images with an object the squared error of the sigmoid box outputs and the
//!   softmax cross-entropy of the class scores.

use kiln_graph::{no_grad, Pool2dGeom, Result, Tensor};
use kiln_nn::{Conv2d, Conv2dConfig, Init, Layer, Linear, Module, Padding, VarStore};

/// Which loss the localiser trains with (see the module's notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LocalizationLoss {
    Squared,
    Mixed,
}

impl std::str::FromStr for LocalizationLoss {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "squared" => Ok(LocalizationLoss::Squared),
            "mixed" => Ok(LocalizationLoss::Mixed),
            _ => Err(format!("unknown localisation loss {s:?} (squared, mixed)")),
        }
    }
}

/// y for one image: [p_c, b_x, b_y, b_h, b_w, one-hot class], zeros after p_c for an empty image. `bbox` is
/// (x1, y1, x2, y2) in pixels of a `size` x `size` image.
pub fn encode_target(object: Option<([f32; 4], u32)>, size: usize, classes: usize) -> Vec<f32> {
    let mut y = vec![0f32; 5 + classes];
    if let Some((b, class)) = object {
        let s = size as f32;
        y[..5].copy_from_slice(&[1.0, (b[0] + b[2]) / 2.0 / s, (b[1] + b[3]) / 2.0 / s, (b[3] - b[1]) / s, (b[2] - b[0]) / s]);
        y[5 + class as usize] = 1.0;
    }
    y
}

/// The box (x1, y1, x2, y2) in pixels of (b_x, b_y, b_h, b_w) fractions of a `size`-pixel image.
pub fn decode_box(b: [f32; 4], size: usize) -> [f32; 4] {
    let s = size as f32;
    let [bx, by, bh, bw] = b;
    [(bx - bw / 2.0) * s, (by - bh / 2.0) * s, (bx + bw / 2.0) * s, (by + bh / 2.0) * s]
}

/// Four 3x3 convolutions (`backbone.{i}`: width, 2x, 4x, 8x channels), each with ReLU and 2x2 max pooling,
/// then `fc` (128, ReLU) and `head` (5 + K outputs).
pub struct Localizer {
    pub backbone: Vec<Conv2d>,
    pub fc: Linear,
    pub head: Linear,
    pub classes: usize,
    pub size: usize,
    pub loss: LocalizationLoss,
}

/// What the localiser says about one image.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Localization {
    /// The probability that there is an object (p_c; for the squared loss the raw output, clamped to [0, 1]).
    pub object: f32,
    pub class: u32,
    /// (x1, y1, x2, y2) in pixels.
    pub bbox: [f32; 4],
}

impl Localizer {
    pub fn new(vs: &mut VarStore, size: usize, classes: usize, width: usize, loss: LocalizationLoss) -> Result<Localizer> {
        if size < 16 || !size.is_multiple_of(16) || classes == 0 || width == 0 {
            return Err(kiln_graph::KilnError::Usage(format!("localize: an image side that is a multiple of 16, classes and width above 0 are needed (got {size}, {classes}, {width})")));
        }
        let same = Conv2dConfig { padding: Padding::Same, ..Default::default() };
        let chans = [3, width, 2 * width, 4 * width, 8 * width];
        let backbone = (0..4).map(|i| Conv2d::new(vs, &format!("backbone.{i}"), chans[i], chans[i + 1], 3, same)).collect::<Result<Vec<_>>>()?;
        let side = size / 16;
        let fc = Linear::new(vs, "fc", 8 * width * side * side, 128, Init::HeUniform)?;
        let head = Linear::new(vs, "head", 128, 5 + classes, Init::XavierUniform)?;
        Ok(Localizer { backbone, fc, head, classes, size, loss })
    }

    /// images [n, 3, size, size] -> raw outputs [n, 5 + K].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for conv in &self.backbone {
            x = conv.forward(&x)?.relu()?.max_pool2d(Pool2dGeom::square(2))?.0;
        }
        let n = x.shape()[0];
        let x = x.reshape(&[n, x.numel() / n])?;
        self.head.forward(&self.fc.forward(&x)?.relu()?)
    }

    /// The loss of raw outputs [n, 5 + K] against the targets of the n images, row after row as
    /// [`encode_target`] makes them (on the host: which images hold an object decides the terms).
    pub fn loss(&self, out: &Tensor, y: &[f32]) -> Result<Tensor> {
        let k = 5 + self.classes;
        if out.rank() != 2 || out.shape()[1] != k || y.len() != out.shape()[0] * k {
            return Err(kiln_graph::KilnError::Shape {
                op: "Localizer::loss",
                lhs: out.shape().to_vec(),
                rhs: vec![y.len() / k, k],
                detail: format!(": outputs and targets are both [n, 5 + {}]", self.classes),
            });
        }
        let n = out.shape()[0];
        let targets = Tensor::from_slice_on(out.device(), y, &[n, k])?;
        let targets = &targets;
        let present: Vec<f32> = (0..n).map(|i| y[i * (5 + self.classes)]).collect();
        let objects = present.iter().filter(|&&p| p > 0.5).count();
        let dev = out.device();
        let p_c = Tensor::from_slice_on(dev, &present, &[n, 1])?;
        match self.loss {
            LocalizationLoss::Squared => {
                // Every output counts where there is an object; only p_c where there is none.
                let mask: Vec<f32> = present.iter().flat_map(|&p| (0..5 + self.classes).map(move |j| if j == 0 || p > 0.5 { 1.0 } else { 0.0 })).collect();
                let mask = Tensor::from_slice_on(dev, &mask, &[n, 5 + self.classes])?;
                let d = out.sub(targets)?;
                d.mul(&d)?.mul(&mask)?.sum_all()?.scale(1.0 / n as f32)
            }
            LocalizationLoss::Mixed => {
                let presence = kiln_graph::loss::bce_with_logits(&out.slice(1, 0, 1)?, &p_c)?;
                if objects == 0 {
                    return Ok(presence);
                }
                let d = out.slice(1, 1, 4)?.sigmoid()?.sub(&targets.slice(1, 1, 4)?)?;
                let boxes = d.mul(&d)?.broadcast_mul(&p_c)?.sum_all()?.scale(5.0 / objects as f32)?;
                let class = out.slice(1, 5, self.classes)?.log_softmax(1)?.mul(&targets.slice(1, 5, self.classes)?)?.sum_all()?.scale(-1.0 / objects as f32)?;
                presence.add(&boxes)?.add(&class)
            }
        }
    }

    /// Raw outputs [n, 5 + K] as one [`Localization`] per image.
    pub fn decode(&self, out: &Tensor) -> Result<Vec<Localization>> {
        let v = out.to_vec()?;
        let k = 5 + self.classes;
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        Ok(v.chunks(k)
            .map(|r| {
                let (object, b) = match self.loss {
                    LocalizationLoss::Squared => (r[0].clamp(0.0, 1.0), [r[1], r[2], r[3], r[4]]),
                    LocalizationLoss::Mixed => (sigmoid(r[0]), [sigmoid(r[1]), sigmoid(r[2]), sigmoid(r[3]), sigmoid(r[4])]),
                };
                let class = (0..self.classes).max_by(|&a, &c| r[5 + a].total_cmp(&r[5 + c])).unwrap_or(0) as u32;
                Localization { object, class, bbox: decode_box(b, self.size) }
            })
            .collect())
    }
}

impl Module for Localizer {
    fn describe(&self) -> String {
        format!("Localizer({} classes, {} px, {:?} loss)", self.classes, self.size, self.loss)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = self.backbone.iter().enumerate().map(|(i, c)| (format!("backbone.{i}"), c as &dyn Module)).collect();
        v.push(("fc".into(), &self.fc));
        v.push(("head".into(), &self.head));
        v
    }
}

/// What a localisation run trains on and for how long.
#[derive(Clone, Debug)]
pub struct LocalizeConfig {
    /// Scenes of 0 or 1 object (`objects: (0, 1)`).
    pub scenes: kiln_data::ObjectSceneConfig,
    pub width: usize,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub loss: LocalizationLoss,
    pub seed: u64,
    pub test_scenes: usize,
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for LocalizeConfig {
    fn default() -> Self {
        LocalizeConfig {
            scenes: kiln_data::ObjectSceneConfig { size: 64, objects: (0, 1), scale: (0.75, 2.0), ..Default::default() },
            width: 16,
            batch_size: 32,
            steps: 1500,
            lr: 1e-3,
            loss: LocalizationLoss::Mixed,
            seed: 42,
            test_scenes: 500,
            data_dir: None,
        }
    }
}

/// What a localisation run measured on held-out scenes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LocalizeReport {
    pub steps: u64,
    pub loss: LocalizationLoss,
    pub first_loss: f64,
    pub last_loss: f64,
    pub test_scenes: usize,
    /// Share of test images whose presence is right (p_c above 0.5 exactly when there is an object).
    pub presence_accuracy: f64,
    /// On the test images with an object: the class right; the mean IoU of the box; both the class right and
    /// IoU at least 0.5 ("correct localisation").
    pub class_accuracy: f64,
    pub mean_iou: f64,
    pub correct_localization: f64,
    pub ms_per_step: f64,
    pub parameters: usize,
}

/// Scenes `from..from + n` of `set` as images [n, 3, s, s] and their targets (rows of 5 + K, on the host).
type LocalizeBatch = (Tensor, Vec<f32>, Vec<kiln_data::ObjectScene>);

fn batch(set: &kiln_data::ObjectScenes, from: usize, n: usize, size: usize) -> Result<LocalizeBatch> {
    let (px, scenes) = set.batch(from, n).map_err(|e| kiln_graph::KilnError::Data(e.to_string()))?;
    let y: Vec<f32> = scenes.iter().flat_map(|sc| encode_target(sc.objects.first().map(|o| (o.bbox, o.class)), size, set.classes())).collect();
    Ok((Tensor::from_slice(&px, &[n, 3, size, size])?, y, scenes))
}

/// Trains on fresh seeded scenes of the training objects and scores the held-out scenes.
pub fn train_localizer(cfg: &LocalizeConfig, mut progress: impl FnMut(u64, f32)) -> Result<(Localizer, LocalizeReport)> {
    use kiln_data::{ObjectScenes, ObjectSplit};
    if cfg.batch_size == 0 || cfg.scenes.objects.1 > 1 {
        return Err(kiln_graph::KilnError::Usage(format!("localize: a batch size above 0 and scenes of at most one object are needed (got {} and {:?})", cfg.batch_size, cfg.scenes.objects)));
    }
    let data_err = |e: kiln_data::DataError| kiln_graph::KilnError::Data(e.to_string());
    let size = cfg.scenes.size;
    let train = ObjectScenes::new(cfg.scenes, ObjectSplit::Train, cfg.seed, (cfg.steps as usize * cfg.batch_size).max(1), cfg.data_dir.as_deref()).map_err(data_err)?;
    let test = ObjectScenes::new(cfg.scenes, ObjectSplit::Test, cfg.seed, cfg.test_scenes, cfg.data_dir.as_deref()).map_err(data_err)?;
    let mut vs = VarStore::new(cfg.seed);
    let model = Localizer::new(&mut vs, size, train.classes(), cfg.width, cfg.loss)?;
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, cfg.lr, cfg.steps, Some(10.0))?;
    let started = std::time::Instant::now();
    let mut trace = crate::trainer::LossTrace::default();
    for step in 0..cfg.steps {
        let (x, y, _) = batch(&train, step as usize * cfg.batch_size, cfg.batch_size, size)?;
        let l = model.loss(&model.forward(&x)?, &y)?;
        opt.step(&vs, &l.backward()?)?;
        trace.record(step, &l, &mut progress)?;
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    let (mut presence, mut with_object, mut class_right, mut iou_sum, mut correct) = (0usize, 0usize, 0usize, 0f64, 0usize);
    for from in (0..test.len).step_by(cfg.batch_size) {
        let n = cfg.batch_size.min(test.len - from);
        let (x, _, scenes) = batch(&test, from, n, size)?;
        let found = model.decode(&no_grad(|| model.forward(&x))?)?;
        for (sc, f) in scenes.iter().zip(&found) {
            let truth = sc.objects.first();
            presence += usize::from((f.object > 0.5) == truth.is_some());
            if let Some(o) = truth {
                let iou = kiln_nn::detection_metrics::iou(&o.bbox, &f.bbox);
                with_object += 1;
                class_right += usize::from(f.class == o.class);
                iou_sum += iou;
                correct += usize::from(f.class == o.class && iou >= 0.5);
            }
        }
    }
    let share = |k: usize, of: usize| k as f64 / of.max(1) as f64;
    let report = LocalizeReport {
        steps: cfg.steps,
        loss: cfg.loss,
        first_loss: trace.first,
        last_loss: trace.last,
        test_scenes: test.len,
        presence_accuracy: share(presence, test.len),
        class_accuracy: share(class_right, with_object),
        mean_iou: iou_sum / with_object.max(1) as f64,
        correct_localization: share(correct, with_object),
        ms_per_step,
        parameters: vs.num_values(),
    };
    Ok((model, report))
}

/// A PNG of the first `count` held-out scenes, each twice: the true box, then the localiser's (when p_c > 0.5).
pub fn localize_pictures(model: &Localizer, cfg: &LocalizeConfig, count: usize, path: &std::path::Path) -> Result<()> {
    let data_err = |e: kiln_data::DataError| kiln_graph::KilnError::Data(e.to_string());
    let test = kiln_data::ObjectScenes::new(cfg.scenes, kiln_data::ObjectSplit::Test, cfg.seed, count, cfg.data_dir.as_deref()).map_err(data_err)?;
    let (x, _, scenes) = batch(&test, 0, count, cfg.scenes.size)?;
    let found = model.decode(&no_grad(|| model.forward(&x))?)?;
    let mut panels = Vec::new();
    for (sc, f) in scenes.iter().zip(&found) {
        panels.push((&sc.image[..], sc.objects.iter().map(|o| crate::plot::Overlay { bbox: Some(o.bbox), class: o.class, mask: None }).collect()));
        let guess = if f.object > 0.5 { vec![crate::plot::Overlay { bbox: Some(f.bbox), class: f.class, mask: None }] } else { Vec::new() };
        panels.push((&sc.image[..], guess));
    }
    let size = cfg.scenes.size;
    crate::plot::scenes_png(path, size, (256 / size).max(1), &panels).map_err(|e| kiln_graph::KilnError::Data(format!("writing {}: {e}", path.display())))
}
