//! A two-stage detector of the R-CNN family with a mask head: torchvision's Faster / Mask R-CNN design
//! (`torchvision.models.detection`) at a size lavapipe trains, with its rules for anchors, matching, sampling,
//! box coding and losses.
//!
//! - **Backbone**: four 3x3 convolutions (ReLU), 2x2 max pooling after the first two: one feature map at
//!   stride 4.
//! - **RPN**: a 3x3 convolution, then per anchor an objectness logit and four box deltas (1x1 convolutions).
//!   Anchors as torchvision's `AnchorGenerator` makes them (sizes x aspect ratios at every cell, centred on the
//!   cell's corner, rounded half to even). Training anchors are matched at IoU 0.7 / 0.3 with low-quality
//!   matches kept, 256 sampled per image (half positive at most); proposals are the decoded boxes, clipped,
//!   the best `pre_nms` by objectness, NMS at 0.7 on the GPU (per image), then the best `post_nms`.
//! - **Box head**: RoI-Align 7x7 (sampling ratio 2) on the proposals (the image's objects added while
//!   training), two fully connected layers, class logits (0 is background) and class-specific deltas (box
//!   coder weights 10, 10, 5, 5); proposals matched at IoU 0.5, 64 sampled per image, a quarter positive.
//! - **Mask head**: RoI-Align 14x14 on the positive proposals, four 3x3 convolutions, a 2x2 transposed
//!   convolution (stride 2) and a 1x1 convolution: a 28x28 mask logit per class, trained with binary
//!   cross-entropy on the object's class against the object's mask cut out by RoI-Align, as torchvision does.
//!
//! Losses as torchvision's: the RPN's objectness BCE (mean over the sampled anchors) plus smooth L1
//! (beta 1/9, summed over the positives, divided by the sampled count); the box head's cross-entropy plus
//! smooth L1 the same way; the mask BCE.

use kiln_graph::vision::{batched_nms, nms, RoiAlignGeom};
use kiln_graph::{KilnError, Pool2dGeom, Result, Rng, Tensor};
use kiln_nn::detection_metrics::{Detection, GroundTruth};
use kiln_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, Init, Layer, Linear, Module, Padding, Param, VarStore};

/// torchvision's `AnchorGenerator` for one feature map: for each cell (row-major) and each (aspect ratio,
/// size) pair (ratios outer), the box round([-w/2, -h/2, w/2, h/2]) with h = size sqrt(ratio),
/// w = size / sqrt(ratio), shifted by the cell's corner (x stride, y stride).
pub fn anchor_grid(sizes: &[f32], ratios: &[f32], stride: usize, height: usize, width: usize) -> Vec<[f32; 4]> {
    let mut base = Vec::with_capacity(sizes.len() * ratios.len());
    for &r in ratios {
        let h_ratio = r.sqrt();
        let w_ratio = 1.0 / h_ratio;
        for &s in sizes {
            let (w, h) = (w_ratio * s, h_ratio * s);
            base.push([(-w / 2.0).round_ties_even(), (-h / 2.0).round_ties_even(), (w / 2.0).round_ties_even(), (h / 2.0).round_ties_even()]);
        }
    }
    let mut out = Vec::with_capacity(height * width * base.len());
    for y in 0..height {
        for x in 0..width {
            let (sx, sy) = ((x * stride) as f32, (y * stride) as f32);
            out.extend(base.iter().map(|b| [b[0] + sx, b[1] + sy, b[2] + sx, b[3] + sy]));
        }
    }
    out
}

/// IoU of two (x1, y1, x2, y2) boxes, as torchvision's `box_iou` (0 when both are empty).
fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |b: &[f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// What a box was matched to: an object's index, or one of these.
pub const BELOW_LOW: i64 = -1;
pub const BETWEEN: i64 = -2;

/// torchvision's `Matcher`: each box gets the object it overlaps most (the first on a tie); below `low`
/// it is [`BELOW_LOW`], in [low, high) [`BETWEEN`]. With `allow_low_quality`, every box that attains some
/// object's best IoU keeps its own best match whatever the thresholds said (as torchvision, that match may be
/// another object of the same IoU).
pub fn match_boxes(truths: &[[f32; 4]], boxes: &[[f32; 4]], high: f32, low: f32, allow_low_quality: bool) -> Vec<i64> {
    if truths.is_empty() {
        return vec![BELOW_LOW; boxes.len()];
    }
    let quality: Vec<Vec<f32>> = truths.iter().map(|t| boxes.iter().map(|b| iou(t, b)).collect()).collect();
    let mut best = vec![(0usize, f32::NEG_INFINITY); boxes.len()];
    for (g, row) in quality.iter().enumerate() {
        for (j, &q) in row.iter().enumerate() {
            if q > best[j].1 {
                best[j] = (g, q);
            }
        }
    }
    let mut matches: Vec<i64> = best
        .iter()
        .map(|&(g, q)| {
            if q < low {
                BELOW_LOW
            } else if q < high {
                BETWEEN
            } else {
                g as i64
            }
        })
        .collect();
    if allow_low_quality {
        for row in &quality {
            let top = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            for (j, &q) in row.iter().enumerate() {
                if q == top {
                    matches[j] = best[j].0 as i64;
                }
            }
        }
    }
    matches
}

/// torchvision's `BalancedPositiveNegativeSampler` for one image: labels above 0 are positive, 0 negative,
/// below 0 ignored; at most `per_image * positive_fraction` positives (truncated), negatives filling the rest,
/// each drawn at random. Returns (positives, negatives) as indices.
pub fn sample_balanced(labels: &[i64], per_image: usize, positive_fraction: f32, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut pos: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] >= 1).collect();
    let mut neg: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == 0).collect();
    let n_pos = pos.len().min((per_image as f32 * positive_fraction) as usize);
    let n_neg = neg.len().min(per_image - n_pos);
    rng.shuffle(&mut pos);
    rng.shuffle(&mut neg);
    pos.truncate(n_pos);
    neg.truncate(n_neg);
    (pos, neg)
}

/// torchvision's `BoxCoder` on the CPU: the deltas that take `proposal` to `truth`.
pub fn encode_box(truth: &[f32; 4], proposal: &[f32; 4], weights: [f32; 4]) -> [f32; 4] {
    let (pw, ph) = (proposal[2] - proposal[0], proposal[3] - proposal[1]);
    let (px, py) = (proposal[0] + 0.5 * pw, proposal[1] + 0.5 * ph);
    let (gw, gh) = (truth[2] - truth[0], truth[3] - truth[1]);
    let (gx, gy) = (truth[0] + 0.5 * gw, truth[1] + 0.5 * gh);
    [weights[0] * (gx - px) / pw, weights[1] * (gy - py) / ph, weights[2] * (gw / pw).ln(), weights[3] * (gh / ph).ln()]
}

/// The inverse of [`encode_box`], dw and dh clamped at log(1000 / 16) as torchvision's `decode_single`.
pub fn decode_box(deltas: &[f32], anchor: &[f32; 4], weights: [f32; 4]) -> [f32; 4] {
    let clip = (1000.0f32 / 16.0).ln();
    let (w, h) = (anchor[2] - anchor[0], anchor[3] - anchor[1]);
    let (cx, cy) = (anchor[0] + 0.5 * w, anchor[1] + 0.5 * h);
    let (dx, dy) = (deltas[0] / weights[0], deltas[1] / weights[1]);
    let (dw, dh) = ((deltas[2] / weights[2]).min(clip), (deltas[3] / weights[3]).min(clip));
    let (x, y) = (dx * w + cx, dy * h + cy);
    let (hw, hh) = (0.5 * dw.exp() * w, 0.5 * dh.exp() * h);
    [x - hw, y - hh, x + hw, y + hh]
}

fn clip_box(b: [f32; 4], size: usize) -> [f32; 4] {
    let s = size as f32;
    [b[0].clamp(0.0, s), b[1].clamp(0.0, s), b[2].clamp(0.0, s), b[3].clamp(0.0, s)]
}

const RPN_WEIGHTS: [f32; 4] = [1.0, 1.0, 1.0, 1.0];
const BOX_WEIGHTS: [f32; 4] = [10.0, 10.0, 5.0, 5.0];
const MASK_SIDE: usize = 28;

/// The sizes and counts of a [`TwoStage`] detector.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TwoStageConfig {
    /// Object classes, background not counted.
    pub classes: usize,
    /// Backbone channels: width, 2 width, 4 width, 4 width.
    pub width: usize,
    /// Hidden units of the box head's two layers.
    pub representation: usize,
    /// Channels of the mask head's convolutions.
    pub mask_width: usize,
    pub anchor_sizes: Vec<f32>,
    pub aspect_ratios: Vec<f32>,
    /// Proposals kept before and after the RPN's NMS, training and testing.
    pub pre_nms_train: usize,
    pub post_nms_train: usize,
    pub pre_nms_test: usize,
    pub post_nms_test: usize,
    pub rpn_per_image: usize,
    pub box_per_image: usize,
    /// Test-time detections: score at least this, per-class NMS at this IoU, at most this many.
    pub score_threshold: f32,
    pub nms_threshold: f32,
    pub detections_per_image: usize,
}

impl Default for TwoStageConfig {
    fn default() -> Self {
        TwoStageConfig {
            classes: 20,
            width: 16,
            representation: 256,
            mask_width: 32,
            anchor_sizes: vec![16.0, 32.0, 64.0],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            pre_nms_train: 300,
            post_nms_train: 150,
            pre_nms_test: 300,
            post_nms_test: 100,
            rpn_per_image: 256,
            box_per_image: 64,
            score_threshold: 0.05,
            nms_threshold: 0.5,
            detections_per_image: 100,
        }
    }
}

/// The backbone's stride.
pub const STRIDE: usize = 4;

/// One image's objects as the detector trains on them: boxes, classes (0-based) and masks [size * size].
#[derive(Clone, Debug, Default)]
pub struct Targets {
    pub boxes: Vec<[f32; 4]>,
    pub classes: Vec<u32>,
    pub masks: Vec<Vec<u8>>,
}

/// One detection with its mask pasted into the image ([size * size], 0 or 1).
#[derive(Clone, Debug)]
pub struct MaskedDetection {
    pub detection: Detection,
    pub mask: Vec<u8>,
}

/// The five losses of a training step (each a scalar on the tape) and their sum.
pub struct TwoStageLosses {
    pub rpn_objectness: Tensor,
    pub rpn_box: Tensor,
    pub classifier: Tensor,
    pub box_reg: Tensor,
    pub mask: Tensor,
}

impl TwoStageLosses {
    pub fn total(&self) -> Result<Tensor> {
        self.rpn_objectness.add(&self.rpn_box)?.add(&self.classifier)?.add(&self.box_reg)?.add(&self.mask)
    }
}

/// The detector; parameter names follow torchvision's Mask R-CNN (`rpn.head.*`, `roi_heads.box_head.*`,
/// `roi_heads.box_predictor.*`, `roi_heads.mask_head.*`, `roi_heads.mask_predictor.*`).
pub struct TwoStage {
    pub cfg: TwoStageConfig,
    pub backbone: Vec<Conv2d>,
    pub rpn_conv: Conv2d,
    pub rpn_cls: Conv2d,
    pub rpn_box: Conv2d,
    pub fc6: Linear,
    pub fc7: Linear,
    pub cls_score: Linear,
    pub bbox_pred: Linear,
    pub mask_fcn: Vec<Conv2d>,
    pub conv5_mask: ConvTranspose2d,
    pub mask_logits: Conv2d,
}

/// What the RPN made of a batch: rows in (image, row, column, anchor) order.
struct RpnOut {
    objectness: Tensor,
    deltas: Tensor,
    anchors: Vec<[f32; 4]>,
}

impl TwoStage {
    pub fn new(vs: &mut VarStore, cfg: TwoStageConfig) -> Result<TwoStage> {
        if cfg.classes == 0 || cfg.width == 0 || cfg.anchor_sizes.is_empty() || cfg.aspect_ratios.is_empty() {
            return Err(KilnError::Usage(format!(
                "two-stage detector: classes, width, anchor sizes and aspect ratios must not be zero or empty (got {} classes, width {}, {} sizes, {} ratios)",
                cfg.classes,
                cfg.width,
                cfg.anchor_sizes.len(),
                cfg.aspect_ratios.len()
            )));
        }
        let same = Conv2dConfig { padding: Padding::Same, ..Default::default() };
        let w = cfg.width;
        let chans = [3, w, 2 * w, 4 * w, 4 * w];
        let backbone = (0..4).map(|i| Conv2d::new(vs, &format!("backbone.{i}"), chans[i], chans[i + 1], 3, same)).collect::<Result<Vec<_>>>()?;
        let c = 4 * w;
        let a = cfg.anchor_sizes.len() * cfg.aspect_ratios.len();
        let small = Conv2dConfig { init: Init::Normal { std: 0.01 }, ..Default::default() };
        let rpn_conv = Conv2d::new(vs, "rpn.head.conv", c, c, 3, Conv2dConfig { init: Init::Normal { std: 0.01 }, padding: Padding::Same, ..Default::default() })?;
        let rpn_cls = Conv2d::new(vs, "rpn.head.cls_logits", c, a, 1, small)?;
        let rpn_box = Conv2d::new(vs, "rpn.head.bbox_pred", c, 4 * a, 1, small)?;
        let k = cfg.classes + 1;
        let fc6 = Linear::new(vs, "roi_heads.box_head.fc6", c * 49, cfg.representation, Init::HeNormal)?;
        let fc7 = Linear::new(vs, "roi_heads.box_head.fc7", cfg.representation, cfg.representation, Init::HeNormal)?;
        let cls_score = Linear::new(vs, "roi_heads.box_predictor.cls_score", cfg.representation, k, Init::Normal { std: 0.01 })?;
        let bbox_pred = Linear::new(vs, "roi_heads.box_predictor.bbox_pred", cfg.representation, 4 * k, Init::Normal { std: 0.001 })?;
        let mw = cfg.mask_width;
        let mask_fcn = (0..4).map(|i| Conv2d::new(vs, &format!("roi_heads.mask_head.mask_fcn{}", i + 1), if i == 0 { c } else { mw }, mw, 3, same)).collect::<Result<Vec<_>>>()?;
        let conv5_mask = ConvTranspose2d::new(vs, "roi_heads.mask_predictor.conv5_mask", mw, mw, 2, 2, 0, 0, 1, true)?;
        let mask_logits = Conv2d::new(vs, "roi_heads.mask_predictor.mask_fcn_logits", mw, k, 1, Conv2dConfig::default())?;
        Ok(TwoStage { cfg, backbone, rpn_conv, rpn_cls, rpn_box, fc6, fc7, cls_score, bbox_pred, mask_fcn, conv5_mask, mask_logits })
    }

    fn anchors_per_cell(&self) -> usize {
        self.cfg.anchor_sizes.len() * self.cfg.aspect_ratios.len()
    }

    /// images [n, 3, h, w] (h, w divisible by 4) -> features [n, 4 width, h / 4, w / 4].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let s = images.shape();
        if s.len() != 4 || s[1] != 3 || !s[2].is_multiple_of(STRIDE) || !s[3].is_multiple_of(STRIDE) || s[2] == 0 || s[3] == 0 {
            return Err(KilnError::Usage(format!("two-stage detector: expects images [n, 3, h, w] with h and w multiples of {STRIDE}, got {s:?}")));
        }
        let mut x = images.clone();
        for (i, conv) in self.backbone.iter().enumerate() {
            x = conv.forward(&x)?.relu()?;
            if i < 2 {
                x = x.max_pool2d(Pool2dGeom::square(2))?.0;
            }
        }
        Ok(x)
    }

    fn rpn(&self, feats: &Tensor) -> Result<RpnOut> {
        let (n, h, w) = (feats.shape()[0], feats.shape()[2], feats.shape()[3]);
        let a = self.anchors_per_cell();
        let t = self.rpn_conv.forward(feats)?.relu()?;
        let objectness = self.rpn_cls.forward(&t)?.permute(&[0, 2, 3, 1])?.reshape(&[n * h * w * a])?;
        let deltas = self.rpn_box.forward(&t)?.reshape(&[n, a, 4, h, w])?.permute(&[0, 3, 4, 1, 2])?.reshape(&[n * h * w * a, 4])?;
        Ok(RpnOut { objectness, deltas, anchors: anchor_grid(&self.cfg.anchor_sizes, &self.cfg.aspect_ratios, STRIDE, h, w) })
    }

    /// The RPN's proposals per image (torchvision's `filter_proposals`): decoded, clipped, the best `pre_nms`
    /// by objectness, boxes under 1e-3 pixels dropped, NMS at 0.7 on the GPU, the best `post_nms` kept.
    fn proposals(&self, rpn: &RpnOut, n: usize, size: usize, pre_nms: usize, post_nms: usize) -> Result<Vec<Vec<[f32; 4]>>> {
        let obj = rpn.objectness.to_vec()?;
        let deltas = rpn.deltas.to_vec()?;
        let per = rpn.anchors.len();
        let dev = rpn.objectness.device();
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut order: Vec<usize> = (0..per).collect();
            order.sort_by(|&a, &b| obj[i * per + b].total_cmp(&obj[i * per + a]));
            order.truncate(pre_nms);
            let (mut boxes, mut scores) = (Vec::new(), Vec::new());
            for j in order {
                let r = i * per + j;
                let b = clip_box(decode_box(&deltas[4 * r..4 * r + 4], &rpn.anchors[j], RPN_WEIGHTS), size);
                if b[2] - b[0] >= 1e-3 && b[3] - b[1] >= 1e-3 {
                    boxes.push(b);
                    scores.push(obj[r]);
                }
            }
            if boxes.is_empty() {
                out.push(boxes);
                continue;
            }
            // One call per image: the suppression's cost grows with the square of the boxes.
            let keep = nms(&Tensor::from_slice_on(dev, &boxes.concat(), &[boxes.len(), 4])?, &Tensor::from_slice_on(dev, &scores, &[scores.len()])?, 0.7)?;
            out.push(keep.iter().take(post_nms).map(|&k| boxes[k as usize]).collect());
        }
        Ok(out)
    }

    /// The box head on `rois` [k, 5] -> (class logits [k, classes + 1], deltas [k, 4 (classes + 1)]).
    fn box_head(&self, feats: &Tensor, rois: &Tensor) -> Result<(Tensor, Tensor)> {
        let pooled = feats.roi_align(rois, RoiAlignGeom::new([7, 7], 1.0 / STRIDE as f32, 2, false))?;
        let k = pooled.shape()[0];
        let x = self.fc6.forward(&pooled.reshape(&[k, pooled.numel() / k.max(1)])?)?.relu()?;
        let x = self.fc7.forward(&x)?.relu()?;
        Ok((self.cls_score.forward(&x)?, self.bbox_pred.forward(&x)?))
    }

    /// The mask head on `rois` [k, 5] -> mask logits [k, classes + 1, 28, 28].
    fn mask_head(&self, feats: &Tensor, rois: &Tensor) -> Result<Tensor> {
        let mut x = feats.roi_align(rois, RoiAlignGeom::new([14, 14], 1.0 / STRIDE as f32, 2, false))?;
        for conv in &self.mask_fcn {
            x = conv.forward(&x)?.relu()?;
        }
        self.mask_logits.forward(&self.conv5_mask.forward(&x)?.relu()?)
    }

    /// The training losses of a batch `images` [n, 3, s, s] with one [`Targets`] per image; `rng` draws the
    /// sampled anchors and proposals.
    pub fn losses(&self, images: &Tensor, targets: &[Targets], rng: &mut Rng) -> Result<TwoStageLosses> {
        let (n, size) = (images.shape()[0], images.shape()[2]);
        if targets.len() != n {
            return Err(KilnError::Usage(format!("two-stage detector: {} targets for a batch of {n} images", targets.len())));
        }
        if let Some((i, t)) = targets.iter().enumerate().find(|(_, t)| t.boxes.len() != t.classes.len() || t.boxes.len() != t.masks.len()) {
            return Err(KilnError::Usage(format!("two-stage detector: image {i} has {} boxes, {} classes and {} masks", t.boxes.len(), t.classes.len(), t.masks.len())));
        }
        if let Some(c) = targets.iter().flat_map(|t| t.classes.iter()).find(|&&c| c as usize >= self.cfg.classes) {
            return Err(KilnError::Usage(format!("two-stage detector: class {c} out of range for {} classes", self.cfg.classes)));
        }
        let dev = images.device();
        let feats = self.features(images)?;
        let rpn = self.rpn(&feats)?;
        let per = rpn.anchors.len();

        // RPN targets: anchors matched at 0.7 / 0.3 (low-quality matches kept), 256 sampled per image.
        let (mut sampled, mut sampled_labels, mut pos_rows, mut pos_targets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, t) in targets.iter().enumerate() {
            let m = match_boxes(&t.boxes, &rpn.anchors, 0.7, 0.3, true);
            let labels: Vec<i64> = m
                .iter()
                .map(|&g| {
                    if g >= 0 {
                        1
                    } else if g == BELOW_LOW {
                        0
                    } else {
                        -1
                    }
                })
                .collect();
            let (pos, neg) = sample_balanced(&labels, self.cfg.rpn_per_image, 0.5, rng);
            for &j in &pos {
                pos_rows.push((i * per + j) as u32);
                pos_targets.extend(encode_box(&t.boxes[m[j] as usize], &rpn.anchors[j], RPN_WEIGHTS));
            }
            sampled.extend(pos.iter().chain(&neg).map(|&j| (i * per + j) as u32));
            sampled_labels.extend(pos.iter().map(|_| 1.0f32).chain(neg.iter().map(|_| 0.0)));
        }
        let rows = Tensor::from_u32_on(dev, &sampled, &[sampled.len()])?;
        let rpn_objectness = kiln_graph::loss::bce_with_logits(&rpn.objectness.index_select(0, &rows)?, &Tensor::from_slice_on(dev, &sampled_labels, &[sampled.len()])?)?;
        let rpn_box = summed_smooth_l1(dev, &rpn.deltas, &pos_rows, &pos_targets, sampled.len())?;

        // Box head targets: proposals plus the objects, matched at 0.5, 64 sampled per image, a quarter positive.
        let proposals = kiln_graph::no_grad(|| self.proposals(&rpn, n, size, self.cfg.pre_nms_train, self.cfg.post_nms_train))?;
        let k1 = self.cfg.classes + 1;
        let (mut rois, mut labels, mut reg_rows, mut reg_targets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut mask_rois, mut mask_labels, mut mask_sources) = (Vec::new(), Vec::new(), Vec::new());
        let mut first_mask = 0;
        for (i, t) in targets.iter().enumerate() {
            let mut boxes = proposals[i].clone();
            boxes.extend(&t.boxes);
            let m = match_boxes(&t.boxes, &boxes, 0.5, 0.5, false);
            let cls: Vec<i64> = m
                .iter()
                .map(|&g| {
                    if g >= 0 {
                        t.classes[g as usize] as i64 + 1
                    } else if g == BELOW_LOW {
                        0
                    } else {
                        -1
                    }
                })
                .collect();
            let (pos, neg) = sample_balanced(&cls, self.cfg.box_per_image, 0.25, rng);
            for &j in &pos {
                let row = rois.len() / 5;
                let g = m[j] as usize;
                reg_rows.push((row * k1) as u32 + cls[j] as u32);
                reg_targets.extend(encode_box(&t.boxes[g], &boxes[j], BOX_WEIGHTS));
                mask_rois.extend([i as f32, boxes[j][0], boxes[j][1], boxes[j][2], boxes[j][3]]);
                mask_labels.push(((mask_labels.len() * k1) as u32) + cls[j] as u32);
                mask_sources.extend([(first_mask + g) as f32, boxes[j][0], boxes[j][1], boxes[j][2], boxes[j][3]]);
                labels.push(cls[j] as u32);
                rois.extend([i as f32, boxes[j][0], boxes[j][1], boxes[j][2], boxes[j][3]]);
            }
            for &j in &neg {
                labels.push(0);
                rois.extend([i as f32, boxes[j][0], boxes[j][1], boxes[j][2], boxes[j][3]]);
            }
            first_mask += t.masks.len();
        }
        let k = labels.len();
        let (class_logits, box_deltas) = self.box_head(&feats, &Tensor::from_slice_on(dev, &rois, &[k, 5])?)?;
        let classifier = kiln_graph::loss::cross_entropy(&class_logits, &Tensor::from_u32_on(dev, &labels, &[k])?)?;
        let box_reg = summed_smooth_l1(dev, &box_deltas.reshape(&[k * k1, 4])?, &reg_rows, &reg_targets, k)?;

        // Mask head: the positives' masks of their own class against the object's mask cut out by RoI-Align
        // (28 x 28, adaptive sampling, unaligned), as torchvision's `project_masks_on_boxes`.
        let p = mask_labels.len();
        let mask = if p == 0 {
            class_logits.sum_all()?.scale(0.0)?
        } else {
            let all_masks: Vec<f32> = targets.iter().flat_map(|t| t.masks.iter().flat_map(|m| m.iter().map(|&v| v as f32))).collect();
            let gt = Tensor::from_slice_on(dev, &all_masks, &[first_mask, 1, size, size])?;
            let wanted = gt.roi_align(&Tensor::from_slice_on(dev, &mask_sources, &[p, 5])?, RoiAlignGeom::new([MASK_SIDE, MASK_SIDE], 1.0, -1, false))?.reshape(&[p, MASK_SIDE * MASK_SIDE])?;
            let logits = self.mask_head(&feats, &Tensor::from_slice_on(dev, &mask_rois, &[p, 5])?)?.reshape(&[p * k1, MASK_SIDE * MASK_SIDE])?;
            let own = logits.index_select(0, &Tensor::from_u32_on(dev, &mask_labels, &[p])?)?;
            kiln_graph::loss::bce_with_logits(&own, &wanted)?
        };
        Ok(TwoStageLosses { rpn_objectness, rpn_box, classifier, box_reg, mask })
    }

    /// Detections with pasted masks for each image of a batch (torchvision's `postprocess_detections`):
    /// per class the decoded boxes, clipped, softmax scores at least `score_threshold`, boxes under 0.01
    /// pixels dropped, per-class NMS on the GPU, the best `detections_per_image`; then the mask of each
    /// detection's class, resampled bilinearly into its box and thresholded at 0.5. `image` in each
    /// [`Detection`] is the index in the batch.
    pub fn detect(&self, images: &Tensor) -> Result<Vec<Vec<MaskedDetection>>> {
        kiln_graph::no_grad(|| {
            let (n, size) = (images.shape()[0], images.shape()[2]);
            let dev = images.device();
            let feats = self.features(images)?;
            let rpn = self.rpn(&feats)?;
            let proposals = self.proposals(&rpn, n, size, self.cfg.pre_nms_test, self.cfg.post_nms_test)?;
            let rois: Vec<f32> = proposals.iter().enumerate().flat_map(|(i, ps)| ps.iter().flat_map(move |b| [i as f32, b[0], b[1], b[2], b[3]])).collect();
            let k = rois.len() / 5;
            let mut out = vec![Vec::new(); n];
            if k == 0 {
                return Ok(out);
            }
            let (logits, deltas) = self.box_head(&feats, &Tensor::from_slice_on(dev, &rois, &[k, 5])?)?;
            let probs = logits.softmax(1)?.to_vec()?;
            let deltas = deltas.to_vec()?;
            let k1 = self.cfg.classes + 1;
            let (mut boxes, mut scores, mut groups, mut owners) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in 0..k {
                let img = rois[5 * r] as usize;
                let proposal = [rois[5 * r + 1], rois[5 * r + 2], rois[5 * r + 3], rois[5 * r + 4]];
                for c in 1..k1 {
                    let score = probs[r * k1 + c];
                    if score <= self.cfg.score_threshold {
                        continue;
                    }
                    let b = clip_box(decode_box(&deltas[(r * k1 + c) * 4..][..4], &proposal, BOX_WEIGHTS), size);
                    if b[2] - b[0] >= 1e-2 && b[3] - b[1] >= 1e-2 {
                        boxes.push(b);
                        scores.push(score);
                        groups.push((img * k1 + c) as u32);
                        owners.push((img, c));
                    }
                }
            }
            if boxes.is_empty() {
                return Ok(out);
            }
            let keep = batched_nms(
                &Tensor::from_slice_on(dev, &boxes.concat(), &[boxes.len(), 4])?,
                &Tensor::from_slice_on(dev, &scores, &[scores.len()])?,
                &Tensor::from_u32_on(dev, &groups, &[groups.len()])?,
                self.cfg.nms_threshold,
            )?;
            let mut kept: Vec<usize> = Vec::new();
            let mut per_image = vec![0usize; n];
            for j in keep {
                let img = owners[j as usize].0;
                if per_image[img] < self.cfg.detections_per_image {
                    per_image[img] += 1;
                    kept.push(j as usize);
                }
            }
            let mask_rois: Vec<f32> = kept.iter().flat_map(|&j| [owners[j].0 as f32, boxes[j][0], boxes[j][1], boxes[j][2], boxes[j][3]]).collect();
            let masks = self.mask_head(&feats, &Tensor::from_slice_on(dev, &mask_rois, &[kept.len(), 5])?)?.sigmoid()?.to_vec()?;
            let plane = MASK_SIDE * MASK_SIDE;
            for (q, &j) in kept.iter().enumerate() {
                let (img, c) = owners[j];
                let m = &masks[(q * k1 + c) * plane..][..plane];
                let detection = Detection { image: img, class: c as u32 - 1, score: scores[j], bbox: boxes[j] };
                out[img].push(MaskedDetection { detection, mask: paste_mask(m, &boxes[j], size) });
            }
            Ok(out)
        })
    }
}

/// Smooth L1 (beta 1/9) of the rows `rows` of `pred` [r, 4] against `targets`, summed, over `count`: the box
/// losses of torchvision's RPN and box head. Zero (on the tape) when there are no rows.
fn summed_smooth_l1(dev: &kiln_graph::backend::Device, pred: &Tensor, rows: &[u32], targets: &[f32], count: usize) -> Result<Tensor> {
    if rows.is_empty() {
        return pred.sum_all()?.scale(0.0);
    }
    let picked = pred.index_select(0, &Tensor::from_u32_on(dev, rows, &[rows.len()])?)?;
    let mean = kiln_graph::loss::smooth_l1_loss(&picked, &Tensor::from_slice_on(dev, targets, &[rows.len(), 4])?, 1.0 / 9.0)?;
    mean.scale((4 * rows.len()) as f32 / count.max(1) as f32)
}

/// A 28 x 28 mask of probabilities resampled into `bbox` of a `size` x `size` image: each pixel centre inside
/// the box reads the mask bilinearly (edges clamped); at least 0.5 is the object.
pub fn paste_mask(mask: &[f32], bbox: &[f32; 4], size: usize) -> Vec<u8> {
    let m = MASK_SIDE;
    let mut out = vec![0u8; size * size];
    let (w, h) = ((bbox[2] - bbox[0]).max(1e-6), (bbox[3] - bbox[1]).max(1e-6));
    let (x0, x1) = (bbox[0].floor().max(0.0) as usize, (bbox[2].ceil() as usize).min(size));
    let (y0, y1) = (bbox[1].floor().max(0.0) as usize, (bbox[3].ceil() as usize).min(size));
    let sample = |u: f32, v: f32| {
        let (u, v) = (u.clamp(0.0, (m - 1) as f32), v.clamp(0.0, (m - 1) as f32));
        let (iu, iv) = (u.floor() as usize, v.floor() as usize);
        let (ju, jv) = ((iu + 1).min(m - 1), (iv + 1).min(m - 1));
        let (fu, fv) = (u - iu as f32, v - iv as f32);
        let at = |y: usize, x: usize| mask[y * m + x];
        (1.0 - fv) * ((1.0 - fu) * at(iv, iu) + fu * at(iv, ju)) + fv * ((1.0 - fu) * at(jv, iu) + fu * at(jv, ju))
    };
    for y in y0..y1 {
        for x in x0..x1 {
            let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
            if cx < bbox[0] || cx >= bbox[2] || cy < bbox[1] || cy >= bbox[3] {
                continue;
            }
            let u = (cx - bbox[0]) / w * m as f32 - 0.5;
            let v = (cy - bbox[1]) / h * m as f32 - 0.5;
            if sample(u, v) >= 0.5 {
                out[y * size + x] = 1;
            }
        }
    }
    out
}

/// IoU of two 0/1 masks of the same size (0 when both are empty).
pub fn mask_iou(a: &[u8], b: &[u8]) -> f64 {
    let (mut inter, mut union) = (0u64, 0u64);
    for (&x, &y) in a.iter().zip(b) {
        inter += (x & y) as u64;
        union += (x | y) as u64;
    }
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

impl Module for TwoStage {
    fn describe(&self) -> String {
        format!("TwoStage(classes={}, anchors per cell={})", self.cfg.classes, self.anchors_per_cell())
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = self.backbone.iter().enumerate().map(|(i, c)| (format!("backbone.{i}"), c as &dyn Module)).collect();
        v.push(("rpn.head.conv".into(), &self.rpn_conv));
        v.push(("rpn.head.cls_logits".into(), &self.rpn_cls));
        v.push(("rpn.head.bbox_pred".into(), &self.rpn_box));
        v.push(("roi_heads.box_head.fc6".into(), &self.fc6));
        v.push(("roi_heads.box_head.fc7".into(), &self.fc7));
        v.push(("roi_heads.box_predictor.cls_score".into(), &self.cls_score));
        v.push(("roi_heads.box_predictor.bbox_pred".into(), &self.bbox_pred));
        for (i, c) in self.mask_fcn.iter().enumerate() {
            v.push((format!("roi_heads.mask_head.mask_fcn{}", i + 1), c));
        }
        v.push(("roi_heads.mask_predictor.conv5_mask".into(), &self.conv5_mask));
        v.push(("roi_heads.mask_predictor.mask_fcn_logits".into(), &self.mask_logits));
        v
    }
}

/// What a two-stage run trains on and for how long.
#[derive(Clone, Debug)]
pub struct TwoStageRun {
    pub model: TwoStageConfig,
    pub scenes: kiln_data::ObjectSceneConfig,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub seed: u64,
    pub test_scenes: usize,
    pub data_dir: Option<std::path::PathBuf>,
    /// Where to write `rcnn.safetensors` (the weights, the model's configuration as JSON, the image side and
    /// the class names) after training, for `kiln detect` and [`load_two_stage`].
    pub out_dir: Option<std::path::PathBuf>,
    /// Every this many steps (0: never), [`two_stage_pictures`] of four held-out scenes into `out_dir` as
    /// `scenes-step-NNNNNN.png`.
    pub sample_every: u64,
}

impl Default for TwoStageRun {
    fn default() -> Self {
        TwoStageRun { model: Default::default(), scenes: Default::default(), batch_size: 8, steps: 3000, lr: 1e-3, seed: 42, test_scenes: 200, data_dir: None, out_dir: None, sample_every: 0 }
    }
}

/// What a two-stage run measured on held-out scenes: box mAP@0.5 (VOC, all points), COCO box and mask AP
/// (pycocotools' definitions, mask IoU on the pasted masks) and mask AP@0.5.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TwoStageReport {
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// The five losses of the last step: RPN objectness, RPN box, classifier, box regression, mask.
    pub last_parts: [f64; 5],
    pub box_map50: f64,
    pub box_coco_map: f64,
    pub mask_coco_map: f64,
    pub mask_map50: f64,
    pub ms_per_step: f64,
    pub parameters: usize,
}

/// A scene's objects as [`Targets`].
pub fn scene_targets(scene: &kiln_data::ObjectScene) -> Targets {
    Targets { boxes: scene.objects.iter().map(|o| o.bbox).collect(), classes: scene.objects.iter().map(|o| o.class).collect(), masks: scene.objects.iter().map(|o| o.mask.clone()).collect() }
}

/// Trains on fresh training scenes (Adam, warm-up and cosine decay, gradients clipped at 10) and scores the
/// held-out scenes.
pub fn train_two_stage(run: &TwoStageRun, mut progress: impl FnMut(u64, f32)) -> Result<(TwoStage, TwoStageReport)> {
    use kiln_data::{ObjectScenes, ObjectSplit};
    let data_err = |e: kiln_data::DataError| KilnError::Data(e.to_string());
    let size = run.scenes.size;
    if run.batch_size == 0 || size < 16 || !size.is_multiple_of(STRIDE) {
        return Err(KilnError::Usage(format!("two-stage detector: a batch above 0 and scenes of at least 16 pixels, a multiple of {STRIDE}, are needed (batch {}, size {size})", run.batch_size)));
    }
    let train = ObjectScenes::new(run.scenes, ObjectSplit::Train, run.seed, (run.steps as usize * run.batch_size).max(1), run.data_dir.as_deref()).map_err(data_err)?;
    let test = ObjectScenes::new(run.scenes, ObjectSplit::Test, run.seed, run.test_scenes, run.data_dir.as_deref()).map_err(data_err)?;
    let mut vs = VarStore::new(run.seed);
    let model = TwoStage::new(&mut vs, TwoStageConfig { classes: train.classes(), ..run.model.clone() })?;
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, run.lr, run.steps, Some(10.0))?;
    let mut rng = Rng::new(run.seed ^ 0x5a5a);
    let batch = |set: &ObjectScenes, from: usize, n: usize| -> Result<(Tensor, Vec<kiln_data::ObjectScene>)> {
        let (px, scenes) = set.batch(from, n).map_err(data_err)?;
        Ok((Tensor::from_slice(&px, &[n, 3, size, size])?, scenes))
    };
    let started = std::time::Instant::now();
    let (mut first, mut last, mut last_parts) = (f64::NAN, f64::NAN, [f64::NAN; 5]);
    for step in 0..run.steps {
        let (x, scenes) = batch(&train, step as usize * run.batch_size, run.batch_size)?;
        let targets: Vec<Targets> = scenes.iter().map(scene_targets).collect();
        let parts = model.losses(&x, &targets, &mut rng)?;
        let l = parts.total()?;
        opt.step(&vs, &l.backward()?)?;
        let v = l.to_scalar()? as f64;
        if step == 0 {
            first = v;
        }
        if step + 1 == run.steps {
            let each = [&parts.rpn_objectness, &parts.rpn_box, &parts.classifier, &parts.box_reg, &parts.mask];
            for (slot, t) in last_parts.iter_mut().zip(each) {
                *slot = t.to_scalar()? as f64;
            }
        }
        last = v;
        progress(step + 1, v as f32);
        if let Some(path) = crate::trainer::sample_picture_path(run.out_dir.as_deref(), run.sample_every, step + 1)? {
            two_stage_pictures(&model, run, 4, &path)?;
        }
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / run.steps.max(1) as f64;
    let (mut dets, mut det_masks, mut truths, mut truth_masks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for from in (0..test.len).step_by(run.batch_size) {
        let n = run.batch_size.min(test.len - from);
        let (x, scenes) = batch(&test, from, n)?;
        for (j, found) in model.detect(&x)?.into_iter().enumerate() {
            for d in found {
                dets.push(Detection { image: from + j, ..d.detection });
                det_masks.push(d.mask);
            }
            for o in &scenes[j].objects {
                truths.push(GroundTruth { image: from + j, class: o.class, bbox: o.bbox });
                truth_masks.push(o.mask.clone());
            }
        }
    }
    let box_map50 = kiln_nn::detection_metrics::voc_map(&dets, &truths, 0.5).0;
    let box_coco_map = kiln_nn::detection_metrics::coco_eval(&dets, &truths).ap;
    let area = |m: &Vec<u8>| m.iter().map(|&v| v as f64).sum::<f64>();
    let masks = kiln_nn::detection_metrics::coco_eval_with(&dets, &truths, |d, g| mask_iou(&det_masks[d], &truth_masks[g]), |d| area(&det_masks[d]), |g| area(&truth_masks[g]));
    if let Some(dir) = &run.out_dir {
        std::fs::create_dir_all(dir).map_err(|e| KilnError::Io { path: dir.display().to_string(), message: e.to_string() })?;
        save_two_stage(&dir.join("rcnn.safetensors"), &vs, &model, size, &run.scenes.source.class_names())?;
    }
    let report = TwoStageReport {
        steps: run.steps,
        first_loss: first,
        last_loss: last,
        last_parts,
        box_map50,
        box_coco_map,
        mask_coco_map: masks.ap,
        mask_map50: masks.ap50,
        ms_per_step,
        parameters: vs.num_values(),
    };
    Ok((model, report))
}

/// A PNG of the first `count` held-out scenes of a run, each twice: the true boxes and masks, then the
/// detections scoring above 0.5 with their masks.
pub fn two_stage_pictures(model: &TwoStage, run: &TwoStageRun, count: usize, path: &std::path::Path) -> Result<()> {
    let data_err = |e: kiln_data::DataError| KilnError::Data(e.to_string());
    let test = kiln_data::ObjectScenes::new(run.scenes, kiln_data::ObjectSplit::Test, run.seed, count, run.data_dir.as_deref()).map_err(data_err)?;
    let size = run.scenes.size;
    let (px, scenes) = test.batch(0, count).map_err(data_err)?;
    let found = model.detect(&Tensor::from_slice(&px, &[count, 3, size, size])?)?;
    let mut panels = Vec::new();
    for (sc, dets) in scenes.iter().zip(&found) {
        panels.push((&sc.image[..], sc.objects.iter().map(|o| crate::plot::Overlay { bbox: Some(o.bbox), class: o.class, mask: Some(&o.mask[..]) }).collect()));
        let shown = dets.iter().filter(|d| d.detection.score > 0.5);
        panels.push((&sc.image[..], shown.map(|d| crate::plot::Overlay { bbox: Some(d.detection.bbox), class: d.detection.class, mask: Some(&d.mask[..]) }).collect()));
    }
    crate::plot::scenes_png(path, size, (256 / size).max(1), &panels).map_err(|e| KilnError::Data(format!("writing {}: {e}", path.display())))
}

/// Writes a detector's weights with its configuration (JSON), image side and class names in the metadata,
/// atomically: what [`load_two_stage`] and `kiln detect` read.
pub fn save_two_stage(path: &std::path::Path, vs: &VarStore, model: &TwoStage, size: usize, class_names: &[String]) -> Result<()> {
    let mut ck = vs.to_checkpoint()?;
    let config = serde_json::to_string(&model.cfg).map_err(|e| KilnError::Usage(e.to_string()))?;
    for (k, v) in [("kiln.model", "rcnn".to_string()), ("kiln.config", config), ("kiln.size", size.to_string()), ("kiln.class_names", class_names.join("|"))] {
        ck.metadata.insert(k.into(), v);
    }
    kiln_nn::checkpoint::save(path, &ck).map_err(|e| KilnError::Checkpoint(e.to_string()))
}

/// A detector written by `train_two_stage` with an `out_dir` (`kiln train rcnn` writes one), on the current
/// device, with its image side and class names. A file that is not such a checkpoint names the file and what
/// is missing.
pub fn load_two_stage(path: &std::path::Path) -> Result<(TwoStage, usize, Vec<String>)> {
    let saved = crate::saved::SavedModel::open(path, "rcnn", "a two-stage detector checkpoint of `kiln train rcnn`")?;
    let cfg: TwoStageConfig = serde_json::from_str(&saved.meta("kiln.config")?).map_err(|e| saved.bad(&format!("its kiln.config does not read: {e}")))?;
    let size = saved.number("kiln.size")?;
    let names: Vec<String> = saved.meta("kiln.class_names")?.split('|').map(str::to_string).collect();
    if names.len() != cfg.classes {
        return Err(saved.bad(&format!("{} class names for {} classes", names.len(), cfg.classes)));
    }
    let mut vs = VarStore::new(0);
    let model = TwoStage::new(&mut vs, cfg)?;
    vs.finish()?;
    saved.load_into(&vs)?;
    Ok((model, size, names))
}
