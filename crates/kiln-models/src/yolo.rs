//! YOLO's pieces that come before the network: anchor boxes from k-means over the training boxes with the
//! distance 1 - IoU (YOLOv2, Redmon & Farhadi 2017), boxes compared by size alone (as if centred together).

use kiln_graph::Rng;

/// IoU of two boxes of sizes (w, h) sharing a centre.
pub fn size_iou(a: (f32, f32), b: (f32, f32)) -> f64 {
    let inter = a.0.min(b.0) as f64 * a.1.min(b.1) as f64;
    let union = a.0 as f64 * a.1 as f64 + b.0 as f64 * b.1 as f64 - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Up to `k` anchors (w, h; fewer when there are fewer boxes) from the box sizes `sizes` by k-means with the distance 1 - IoU: the best of 10 runs
/// (as scikit-learn's `n_init`; one run can settle with two anchors in one cluster), each from seeded
/// k-means++ starts, assigning boxes to the anchor of highest IoU and moving each anchor to the median size of
/// its boxes (robust to the odd huge box) until no assignment changes (at most 300 rounds). Sorted by area;
/// with the mean over the boxes of their best IoU with an anchor (the number YOLOv2 reports to choose k).
pub fn kmeans_anchors(sizes: &[(f32, f32)], k: usize, seed: u64) -> (Vec<(f32, f32)>, f64) {
    if sizes.is_empty() || k == 0 {
        return (Vec::new(), 0.0);
    }
    let mut rng = Rng::new(seed);
    let mut best: (Vec<(f32, f32)>, f64) = (Vec::new(), f64::NEG_INFINITY);
    for _ in 0..10 {
        let run = kmeans_once(sizes, k, &mut rng);
        if run.1 > best.1 {
            best = run;
        }
    }
    best
}

fn kmeans_once(sizes: &[(f32, f32)], k: usize, rng: &mut Rng) -> (Vec<(f32, f32)>, f64) {
    let k = k.min(sizes.len());
    // k-means++: each next start drawn with probability proportional to its distance from the nearest start.
    let mut anchors = vec![sizes[rng.below(sizes.len())]];
    while anchors.len() < k {
        let d: Vec<f64> = sizes.iter().map(|&s| anchors.iter().map(|&a| 1.0 - size_iou(s, a)).fold(f64::INFINITY, f64::min)).collect();
        let total: f64 = d.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut r = rng.uniform() * total;
        let mut pick = sizes.len() - 1;
        for (i, &v) in d.iter().enumerate() {
            if r < v {
                pick = i;
                break;
            }
            r -= v;
        }
        anchors.push(sizes[pick]);
    }
    let nearest = |s: (f32, f32), anchors: &[(f32, f32)]| -> usize { (0..anchors.len()).max_by(|&a, &b| size_iou(s, anchors[a]).total_cmp(&size_iou(s, anchors[b]))).unwrap_or(0) };
    let mut assign = vec![usize::MAX; sizes.len()];
    for _ in 0..300 {
        let next: Vec<usize> = sizes.iter().map(|&s| nearest(s, &anchors)).collect();
        if next == assign {
            break;
        }
        assign = next;
        for (j, anchor) in anchors.iter_mut().enumerate() {
            let members: Vec<(f32, f32)> = sizes.iter().zip(&assign).filter(|(_, &a)| a == j).map(|(&s, _)| s).collect();
            if members.is_empty() {
                continue;
            }
            let median = |mut v: Vec<f32>| {
                v.sort_by(f32::total_cmp);
                v[v.len() / 2]
            };
            *anchor = (median(members.iter().map(|m| m.0).collect()), median(members.iter().map(|m| m.1).collect()));
        }
    }
    anchors.sort_by(|a, b| (a.0 * a.1).total_cmp(&(b.0 * b.1)));
    let mean_iou = sizes.iter().map(|&s| size_iou(s, anchors[nearest(s, &anchors)])).sum::<f64>() / sizes.len() as f64;
    (anchors, mean_iou)
}

/// The course's YOLO target for one image (Ng's notation, YOLOv1's grid): an S x S grid of cells, each
/// [p_c, b_x, b_y, b_h, b_w, c_1 .. c_C] with (b_x, b_y) the object's centre within its cell (0-1) and (b_h,
/// b_w) its size in cells; the cell holding an object's centre is responsible for it (where two centres share a
/// cell, the larger object). Boxes (x1, y1, x2, y2) in pixels of an image `image` = (height, width).
pub fn encode_v1(boxes: &[[f32; 4]], labels: &[u32], image: (usize, usize), s: usize, classes: usize) -> Vec<f32> {
    let d = 5 + classes;
    let mut y = vec![0f32; s * s * d];
    let (ch, cw) = (image.0 as f32 / s as f32, image.1 as f32 / s as f32);
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    // Smaller first, so a larger object sharing the cell writes last.
    order.sort_by(|&a, &b| area(&boxes[a]).total_cmp(&area(&boxes[b])));
    for i in order {
        let [x1, y1, x2, y2] = boxes[i];
        let (cx, cy) = ((x1 + x2) / 2.0 / cw, (y1 + y2) / 2.0 / ch);
        let (col, row) = ((cx.floor() as usize).min(s - 1), (cy.floor() as usize).min(s - 1));
        let cell = &mut y[(row * s + col) * d..(row * s + col + 1) * d];
        cell.fill(0.0);
        cell[..5].copy_from_slice(&[1.0, cx - col as f32, cy - row as f32, (y2 - y1) / ch, (x2 - x1) / cw]);
        cell[5 + labels[i] as usize] = 1.0;
    }
    y
}

fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Targets of the anchor form for one image, per (row, col, anchor) on an S x S grid: the anchor whose size
/// fits an object best (IoU of sizes), in the cell of its centre, is responsible for it, with the box target
/// (x offset in the cell, y offset, ln(w / anchor w), ln(h / anchor h)) and the class.
#[derive(Clone, Debug, PartialEq)]
pub struct AnchorTargets {
    /// [S * S * A]: 1 where an anchor is responsible for an object.
    pub object: Vec<f32>,
    /// [S * S * A * 4]
    pub boxes: Vec<f32>,
    /// [S * S * A]: the class where responsible (0 elsewhere).
    pub classes: Vec<u32>,
}

pub fn encode_anchors(boxes: &[[f32; 4]], labels: &[u32], image: (usize, usize), s: usize, anchors: &[(f32, f32)]) -> AnchorTargets {
    let a = anchors.len();
    if a == 0 || s == 0 {
        return AnchorTargets { object: Vec::new(), boxes: Vec::new(), classes: Vec::new() };
    }
    let mut t = AnchorTargets { object: vec![0.0; s * s * a], boxes: vec![0.0; s * s * a * 4], classes: vec![0; s * s * a] };
    let (ch, cw) = (image.0 as f32 / s as f32, image.1 as f32 / s as f32);
    for (b, &label) in boxes.iter().zip(labels) {
        let (w, h) = (b[2] - b[0], b[3] - b[1]);
        if w <= 0.0 || h <= 0.0 {
            continue;
        }
        let (cx, cy) = ((b[0] + b[2]) / 2.0 / cw, (b[1] + b[3]) / 2.0 / ch);
        let (col, row) = ((cx.floor().max(0.0) as usize).min(s - 1), (cy.floor().max(0.0) as usize).min(s - 1));
        let best = (0..a).max_by(|&i, &j| size_iou((w, h), anchors[i]).total_cmp(&size_iou((w, h), anchors[j]))).unwrap_or(0);
        let at = (row * s + col) * a + best;
        t.object[at] = 1.0;
        t.boxes[4 * at..4 * at + 4].copy_from_slice(&[cx - col as f32, cy - row as f32, (w / anchors[best].0).ln(), (h / anchors[best].1).ln()]);
        t.classes[at] = label;
    }
    t
}

use kiln_graph::{Pool2dGeom, Result, Tensor};
use kiln_nn::{Conv2d, Conv2dConfig, Layer, Module, Param, VarStore};

/// How a YOLO head lays out its predictions in each cell of the S x S grid.
#[derive(Clone, Debug, PartialEq)]
pub enum YoloLayout {
    /// YOLOv2's anchor form: per anchor (its w, h in pixels) the objectness logit, (tx, ty, tw, th) and C class
    /// logits: A (5 + C) channels.
    Anchors(Vec<(f32, f32)>),
    /// YOLOv1's layout (Redmon et al. 2016), S x S x (B * 5 + C): B boxes, each (x, y, sqrt w, sqrt h,
    /// confidence), then C class scores shared by the cell. x and y are the centre's offset in the cell
    /// (through a sigmoid), w and h the size in cells (the square of the output, as the paper regresses
    /// square roots), the confidence a sigmoid, the classes a softmax.
    V1 { boxes: usize },
}

impl YoloLayout {
    /// Output channels for `classes` classes.
    pub fn channels(&self, classes: usize) -> usize {
        match self {
            YoloLayout::Anchors(a) => a.len() * (5 + classes),
            YoloLayout::V1 { boxes } => boxes * 5 + classes,
        }
    }
    pub fn name(&self) -> String {
        match self {
            YoloLayout::Anchors(a) => format!("anchors ({})", a.len()),
            YoloLayout::V1 { boxes } => format!("v1 ({boxes} boxes a cell)"),
        }
    }
}

/// A small YOLO on a plain backbone: five 3x3 convolutions with ReLU (`backbone.{i}`), batch norm between
/// them when built with it (YOLOv2's), the first three followed by 2x2 max pooling (a grid of one cell per 8
/// pixels), and a 1x1 `head` laid out as `layout` says (YOLOv2's anchors, or YOLOv1's boxes per cell).
pub struct Yolo {
    pub backbone: Vec<crate::segment::ConvBlock>,
    pub head: Conv2d,
    pub layout: YoloLayout,
    pub classes: usize,
}

/// The grid side for an input side: the backbone divides by 8.
pub fn grid_for(size: usize) -> usize {
    size / 8
}

impl Yolo {
    /// Plain convolutions (with biases).
    pub fn new(vs: &mut VarStore, layout: YoloLayout, classes: usize, width: usize) -> Result<Yolo> {
        Yolo::with_batch_norm(vs, layout, classes, width, false)
    }

    /// With `batch_norm`, every backbone convolution is followed by batch norm (`backbone.{i}.bn`) and has no
    /// bias of its own, as YOLOv2.
    pub fn with_batch_norm(vs: &mut VarStore, layout: YoloLayout, classes: usize, width: usize, batch_norm: bool) -> Result<Yolo> {
        let chans = [3, width, 2 * width, 4 * width, 8 * width, 8 * width];
        let backbone = (0..5).map(|i| crate::segment::ConvBlock::new(vs, &format!("backbone.{i}"), chans[i], chans[i + 1], batch_norm)).collect::<Result<Vec<_>>>()?;
        let head = Conv2d::new(vs, "head", chans[5], layout.channels(classes), 1, Conv2dConfig { init: kiln_nn::Init::Normal { std: 0.01 }, ..Default::default() })?;
        Ok(Yolo { backbone, head, layout, classes })
    }

    /// Whether its backbone has batch norm.
    pub fn batch_norm(&self) -> bool {
        self.backbone.iter().any(|b| b.bn.is_some())
    }

    /// The anchors (none in YOLOv1's layout).
    pub fn anchors(&self) -> &[(f32, f32)] {
        match &self.layout {
            YoloLayout::Anchors(a) => a,
            YoloLayout::V1 { .. } => &[],
        }
    }

    /// images [n, 3, h, w] -> raw predictions [n, A (5 + C), h / 8, w / 8].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for (i, block) in self.backbone.iter().enumerate() {
            x = block.forward(&x)?;
            if i < 3 {
                x = x.max_pool2d(Pool2dGeom::square(2))?.0;
            }
        }
        self.head.forward(&x)
    }

    /// Anchor-form predictions [n, A (5 + C), S, S] as rows [n S S A, 5 + C] in (image, row, column, anchor)
    /// order; YOLOv1's [n, B * 5 + C, S, S] as rows [n S S, B * 5 + C] in (image, row, column) order.
    pub fn rows(&self, pred: &Tensor) -> Result<Tensor> {
        let (n, s) = (pred.shape()[0], pred.shape()[2]);
        match &self.layout {
            YoloLayout::Anchors(anchors) => {
                let (a, d) = (anchors.len(), 5 + self.classes);
                pred.reshape(&[n, a, d, s, s])?.permute(&[0, 3, 4, 1, 2])?.reshape(&[n * s * s * a, d])
            }
            YoloLayout::V1 { boxes } => pred.permute(&[0, 2, 3, 1])?.reshape(&[n * s * s, boxes * 5 + self.classes]),
        }
    }

    /// The anchor form's loss of a batch against per-image targets: objectness binary cross-entropy on every
    /// anchor (those without an object weighted `noobj`), and for the responsible anchors the squared errors of
    /// (sigmoid tx, sigmoid ty, tw, th) times `coord` and the class cross-entropy; summed and divided by the
    /// images.
    pub fn loss(&self, pred: &Tensor, targets: &[AnchorTargets], coord: f32, noobj: f32) -> Result<Tensor> {
        if !matches!(self.layout, YoloLayout::Anchors(_)) {
            return Err(kiln_graph::KilnError::Usage("yolo loss: the anchor form's loss on a YOLOv1 head (use loss_v1)".into()));
        }
        let rows = self.rows(pred)?;
        let (r, c) = (rows.shape()[0], self.classes);
        let dev = pred.device();
        let object: Vec<f32> = targets.iter().flat_map(|t| t.object.iter().copied()).collect();
        if object.len() != r {
            return Err(kiln_graph::KilnError::Usage(format!("yolo loss: {} target anchors for {r} predicted ones", object.len())));
        }
        let weight: Vec<f32> = object.iter().map(|&o| if o > 0.0 { 1.0 } else { noobj }).collect();
        let n = targets.len() as f32;
        let obj_t = Tensor::from_slice_on(dev, &object, &[r, 1])?;
        let obj_w = Tensor::from_slice_on(dev, &weight, &[r, 1])?;
        let logit = rows.slice(1, 0, 1)?;
        let bce = logit.softplus()?.sub(&logit.mul(&obj_t)?)?;
        let obj_loss = bce.mul(&obj_w)?.sum_all()?;
        let box_t = Tensor::from_slice_on(dev, &targets.iter().flat_map(|t| t.boxes.iter().copied()).collect::<Vec<_>>(), &[r, 4])?;
        let pred_box = Tensor::concat(&[&rows.slice(1, 1, 2)?.sigmoid()?, &rows.slice(1, 3, 2)?], 1)?;
        let d = pred_box.sub(&box_t)?;
        let box_loss = d.mul(&d)?.broadcast_mul(&obj_t)?.sum_all()?.scale(coord)?;
        let one_hot: Vec<f32> =
            targets.iter().flat_map(|t| t.object.iter().zip(&t.classes).flat_map(move |(&o, &k)| (0..c).map(move |j| if o > 0.0 && j == k as usize { 1.0 } else { 0.0 }))).collect();
        let cls = rows.slice(1, 5, c)?.log_softmax(1)?.mul(&Tensor::from_slice_on(dev, &one_hot, &[r, c])?)?.sum_all()?.neg()?;
        obj_loss.add(&box_loss)?.add(&cls)?.scale(1.0 / n)
    }

    /// YOLOv1's loss (Redmon et al. 2016, eq. 3) of a batch against per-image [`encode_v1`] targets (S x S x
    /// (5 + C)). In a cell holding an object, the one of its B boxes whose prediction has the highest IoU with
    /// the object is responsible (the first on ties). The loss sums, divided by the images:
    /// - `coord` x ((x - x^)^2 + (y - y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2) over responsible boxes;
    /// - (C - IoU)^2 over responsible boxes (the confidence's target is the prediction's IoU with the object,
    ///   held constant), and `noobj` x C^2 over every other box;
    /// - the squared errors of the class probabilities against the one-hot class, over cells with an object.
    pub fn loss_v1(&self, pred: &Tensor, targets: &[Vec<f32>], coord: f32, noobj: f32) -> Result<Tensor> {
        let YoloLayout::V1 { boxes: b } = self.layout else {
            return Err(kiln_graph::KilnError::Usage("yolo loss_v1: YOLOv1's loss on an anchor-form head (use loss)".into()));
        };
        let (n, s, c) = (pred.shape()[0], pred.shape()[2], self.classes);
        let cells = n * s * s;
        let t_width = 5 + c;
        if targets.len() != n || targets.iter().any(|t| t.len() != s * s * t_width) {
            return Err(kiln_graph::KilnError::Usage(format!(
                "yolo loss_v1: targets of {} images, sizes {:?}, for {n} images of {s} x {s} x {t_width}",
                targets.len(),
                targets.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        let rows = self.rows(pred)?;
        let values = rows.to_vec()?;
        let width = b * 5 + c;
        // The responsible boxes and their targets, chosen on the host from the current predictions.
        let (mut resp, mut t_xy, mut t_wh, mut t_conf) = (vec![0f32; cells * b], vec![0f32; cells * b * 2], vec![0f32; cells * b * 2], vec![0f32; cells * b]);
        let (mut obj_cell, mut one_hot) = (vec![0f32; cells], vec![0f32; cells * c]);
        for (cell, t) in targets.iter().flat_map(|t| t.chunks(t_width)).enumerate() {
            if t[0] <= 0.0 {
                continue;
            }
            obj_cell[cell] = 1.0;
            one_hot[cell * c..(cell + 1) * c].copy_from_slice(&t[5..]);
            // In cell units about the cell's corner: the object (x, y, w, h) = (b_x, b_y, b_w, b_h).
            let truth = [t[1], t[2], t[4], t[3]];
            let v = &values[cell * width..(cell + 1) * width];
            let ious: Vec<f32> = (0..b).map(|j| v1_iou(&v1_box(&v[5 * j..5 * j + 4]), &truth)).collect();
            let best = (0..b).fold(0, |best, j| if ious[j] > ious[best] { j } else { best });
            let r = cell * b + best;
            resp[r] = 1.0;
            t_xy[2 * r..2 * r + 2].copy_from_slice(&[truth[0], truth[1]]);
            t_wh[2 * r..2 * r + 2].copy_from_slice(&[truth[2].sqrt(), truth[3].sqrt()]);
            t_conf[r] = ious[best];
        }
        let dev = pred.device();
        let on = |v: &[f32], shape: &[usize]| Tensor::from_slice_on(dev, v, shape);
        let resp_t = on(&resp, &[cells * b, 1])?;
        let noobj_w: Vec<f32> = resp.iter().map(|&r| noobj * (1.0 - r)).collect();
        let boxes = rows.slice(1, 0, 5 * b)?.reshape(&[cells * b, 5])?;
        let sq = |x: Tensor| -> Result<Tensor> { x.mul(&x) };
        let d_xy = boxes.slice(1, 0, 2)?.sigmoid()?.sub(&on(&t_xy, &[cells * b, 2])?)?;
        let d_wh = boxes.slice(1, 2, 2)?.sub(&on(&t_wh, &[cells * b, 2])?)?;
        let coord_loss = sq(d_xy)?.add(&sq(d_wh)?)?.broadcast_mul(&resp_t)?.sum_all()?.scale(coord)?;
        let conf = boxes.slice(1, 4, 1)?.sigmoid()?;
        let obj_loss = sq(conf.sub(&on(&t_conf, &[cells * b, 1])?)?)?.mul(&resp_t)?.sum_all()?;
        let noobj_loss = sq(conf)?.mul(&on(&noobj_w, &[cells * b, 1])?)?.sum_all()?;
        let d_cls = rows.slice(1, 5 * b, c)?.softmax(1)?.sub(&on(&one_hot, &[cells, c])?)?;
        let cls_loss = sq(d_cls)?.broadcast_mul(&on(&obj_cell, &[cells, 1])?)?.sum_all()?;
        coord_loss.add(&obj_loss)?.add(&noobj_loss)?.add(&cls_loss)?.scale(1.0 / n as f32)
    }

    /// Detections of image `i` of a prediction batch, above `min_score`, per-class NMS at `iou` (on the GPU), at
    /// most 100, best first. Boxes in pixels of an input of side `size`. The score: in the anchor form
    /// sigmoid(objectness) times the best class's probability; in YOLOv1's, each box's confidence times the
    /// cell's best class probability (the paper's class-specific confidence).
    pub fn detect(&self, pred: &Tensor, i: usize, size: usize, min_score: f32, iou: f32) -> Result<Vec<kiln_nn::detection_metrics::Detection>> {
        let s = pred.shape()[2];
        let all = self.rows(&pred.slice(0, i, 1)?)?.to_vec()?;
        let cell = size as f32 / s as f32;
        // The best class and its softmax probability.
        let best_class = |logits: &[f32]| -> (usize, f32) {
            let m = logits.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = logits.iter().map(|&x| (x - m).exp()).sum();
            let (best, _) = logits.iter().enumerate().fold((0, f32::MIN), |acc, (j, &x)| if x > acc.1 { (j, x) } else { acc });
            (best, 1.0 / z)
        };
        let (mut boxes, mut scores, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        let mut push = |score: f32, class: usize, (cx, cy, w, h): (f32, f32, f32, f32)| {
            if score > min_score {
                boxes.push([cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]);
                scores.push(score);
                labels.push(class as u32);
            }
        };
        for row in 0..s {
            for col in 0..s {
                match &self.layout {
                    YoloLayout::Anchors(anchors) => {
                        let (a, d) = (anchors.len(), 5 + self.classes);
                        for (k, anchor) in anchors.iter().enumerate() {
                            let v = &all[((row * s + col) * a + k) * d..][..d];
                            let (class, p) = best_class(&v[5..]);
                            let (cx, cy) = ((col as f32 + sig(v[1])) * cell, (row as f32 + sig(v[2])) * cell);
                            push(sig(v[0]) * p, class, (cx, cy, anchor.0 * v[3].min(4.0).exp(), anchor.1 * v[4].min(4.0).exp()));
                        }
                    }
                    YoloLayout::V1 { boxes: b } => {
                        let v = &all[(row * s + col) * (5 * b + self.classes)..][..5 * b + self.classes];
                        let (class, p) = best_class(&v[5 * b..]);
                        for j in 0..*b {
                            let [x, y, w, h] = v1_box(&v[5 * j..5 * j + 4]);
                            push(sig(v[5 * j + 4]) * p, class, ((col as f32 + x) * cell, (row as f32 + y) * cell, w * cell, h * cell));
                        }
                    }
                }
            }
        }
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let dev = pred.device();
        let bt = Tensor::from_slice_on(dev, &boxes.concat(), &[boxes.len(), 4])?;
        let st = Tensor::from_slice_on(dev, &scores, &[scores.len()])?;
        let lt = Tensor::from_u32_on(dev, &labels, &[labels.len()])?;
        let opts = kiln_graph::vision::NmsOptions { iou_threshold: iou, score_threshold: None, max_keep: Some(100), suppress_equal: false };
        let keep = kiln_graph::vision::nms_with(&bt, &st, Some(&lt), opts)?;
        Ok(keep.into_iter().map(|j| kiln_nn::detection_metrics::Detection { image: i, class: labels[j as usize], score: scores[j as usize], bbox: boxes[j as usize] }).collect())
    }
}

/// The logistic function, on the host (decoding predictions read back).
fn sig(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// A YOLOv1 box's raw outputs (x, y, sqrt w, sqrt h) as (x, y, w, h) in cells: the centre's offset from its
/// cell's corner, and the size.
fn v1_box(raw: &[f32]) -> [f32; 4] {
    [sig(raw[0]), sig(raw[1]), raw[2].max(0.0).powi(2), raw[3].max(0.0).powi(2)]
}

/// IoU of two boxes given as (centre x, centre y, w, h); 0 when either is empty.
pub fn v1_iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let overlap = |c0: f32, s0: f32, c1: f32, s1: f32| ((c0 + s0 / 2.0).min(c1 + s1 / 2.0) - (c0 - s0 / 2.0).max(c1 - s1 / 2.0)).max(0.0);
    let inter = overlap(a[0], a[2], b[0], b[2]) * overlap(a[1], a[3], b[1], b[3]);
    let union = a[2] * a[3] + b[2] * b[3] - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

impl Module for Yolo {
    fn describe(&self) -> String {
        format!("Yolo({}, classes={})", self.layout.name(), self.classes)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = self.backbone.iter().enumerate().map(|(i, c)| (format!("backbone.{i}"), c as &dyn Module)).collect();
        v.push(("head".into(), &self.head));
        v
    }
    fn children_mut(&mut self) -> Vec<&mut dyn Module> {
        // The order of `children`.
        let mut v: Vec<&mut dyn Module> = self.backbone.iter_mut().map(|c| c as &mut dyn Module).collect();
        v.push(&mut self.head);
        v
    }
}

/// What a YOLO run trains on and for how long.
#[derive(Clone, Debug)]
pub struct YoloConfig {
    pub scenes: kiln_data::ObjectSceneConfig,
    /// Anchors found by k-means (the anchor form).
    pub anchors: usize,
    /// YOLOv1's layout with this many boxes a cell instead of anchors (the paper has 2).
    pub v1_boxes: Option<usize>,
    pub width: usize,
    /// Batch norm after every backbone convolution (YOLOv2's; the default); scored, drawn and saved with its
    /// running statistics.
    pub batch_norm: bool,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub seed: u64,
    pub test_scenes: usize,
    pub data_dir: Option<std::path::PathBuf>,
    /// Where to write `yolo.safetensors` (the weights, anchors, sizes and class names) after training, for
    /// `kiln detect` and [`load_yolo`].
    pub out_dir: Option<std::path::PathBuf>,
    /// Every this many steps (0: never), [`yolo_pictures`] of four held-out scenes into `out_dir` as
    /// `scenes-step-NNNNNN.png`: the run's progress as a person sees it.
    pub sample_every: u64,
}

impl Default for YoloConfig {
    fn default() -> Self {
        YoloConfig {
            scenes: Default::default(),
            anchors: 5,
            v1_boxes: None,
            width: 16,
            batch_norm: true,
            batch_size: 16,
            steps: 3000,
            lr: 1e-3,
            seed: 42,
            test_scenes: 200,
            data_dir: None,
            out_dir: None,
            sample_every: 0,
        }
    }
}

/// What a YOLO checkpoint says besides its weights.
#[derive(Clone, Debug)]
pub struct YoloInfo {
    /// The side of the square scenes it was trained on (pictures are resized to it).
    pub size: usize,
    pub class_names: Vec<String>,
}

/// Writes a trained model's weights with what rebuilds it (layout: anchors or YOLOv1's boxes a cell; classes,
/// width, image side, class names) in the metadata, atomically.
pub fn save_yolo(path: &std::path::Path, vs: &VarStore, model: &Yolo, width: usize, info: &YoloInfo) -> Result<()> {
    let mut ck = vs.to_checkpoint()?;
    match &model.layout {
        YoloLayout::Anchors(anchors) => {
            let anchors: Vec<String> = anchors.iter().map(|(w, h)| format!("{w:?}x{h:?}")).collect();
            ck.metadata.insert("kiln.anchors".into(), anchors.join(","));
        }
        YoloLayout::V1 { boxes } => {
            ck.metadata.insert("kiln.v1_boxes".into(), boxes.to_string());
        }
    }
    for (k, v) in [
        ("kiln.model", "yolo".to_string()),
        ("kiln.classes", model.classes.to_string()),
        ("kiln.width", width.to_string()),
        ("kiln.batch_norm", model.batch_norm().to_string()),
        ("kiln.size", info.size.to_string()),
        ("kiln.class_names", info.class_names.join("|")),
    ] {
        ck.metadata.insert(k.into(), v);
    }
    kiln_nn::checkpoint::save(path, &ck).map_err(|e| kiln_graph::KilnError::Checkpoint(e.to_string()))
}

/// A model written by [`save_yolo`] (`kiln train yolo` writes one), on the current device. A file that is not
/// such a checkpoint names the file and what is missing.
pub fn load_yolo(path: &std::path::Path) -> Result<(Yolo, YoloInfo)> {
    let saved = crate::saved::SavedModel::open(path, "yolo", "a YOLO checkpoint of `kiln train yolo`")?;
    let bad = |problem: &str| saved.bad(problem);
    let layout = if saved.ck.metadata.contains_key("kiln.v1_boxes") {
        match saved.number("kiln.v1_boxes")? {
            0 => return Err(bad("kiln.v1_boxes is 0")),
            boxes => YoloLayout::V1 { boxes },
        }
    } else {
        let anchors = saved
            .meta("kiln.anchors")?
            .split(',')
            .map(|a| {
                let (w, h) = a.split_once('x').ok_or_else(|| bad("an anchor is not WxH"))?;
                Ok((w.parse().map_err(|_| bad("an anchor is not WxH"))?, h.parse().map_err(|_| bad("an anchor is not WxH"))?))
            })
            .collect::<Result<Vec<(f32, f32)>>>()?;
        if anchors.is_empty() {
            return Err(bad("no anchors"));
        }
        YoloLayout::Anchors(anchors)
    };
    let (classes, width, size) = (saved.number("kiln.classes")?, saved.number("kiln.width")?, saved.number("kiln.size")?);
    let class_names: Vec<String> = saved.meta("kiln.class_names")?.split('|').map(str::to_string).collect();
    if class_names.len() != classes {
        return Err(bad(&format!("{} class names for {classes} classes", class_names.len())));
    }
    // Older checkpoints, without the key, have plain convolutions.
    let batch_norm = saved.flag("kiln.batch_norm")?;
    let mut vs = VarStore::new(0);
    let mut model = Yolo::with_batch_norm(&mut vs, layout, classes, width, batch_norm)?;
    vs.finish()?;
    saved.load_into(&vs)?;
    model.set_training(false);
    // The parameters live in the store's buffer, which the model's tensors share: the store may go.
    Ok((model, YoloInfo { size, class_names }))
}

/// What a YOLO run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct YoloReport {
    /// "anchors (A)" or "v1 (B boxes a cell)".
    pub layout: String,
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub anchors: Vec<(f32, f32)>,
    pub anchor_mean_iou: f64,
    pub map50: f64,
    pub coco_map: f64,
    pub ms_per_step: f64,
    pub parameters: usize,
}

/// Trains on fresh training scenes (anchors from k-means over 500 training scenes' boxes) and scores VOC-style
/// mAP@0.5 and COCO mAP on held-out scenes.
pub fn train_yolo(cfg: &YoloConfig, mut progress: impl FnMut(u64, f32)) -> Result<(Yolo, YoloReport)> {
    use kiln_data::{ObjectScenes, ObjectSplit};
    if cfg.batch_size == 0 || cfg.anchors == 0 || cfg.v1_boxes == Some(0) || cfg.scenes.size < 16 {
        return Err(kiln_graph::KilnError::Usage(format!(
            "yolo: a batch size, anchors and YOLOv1 boxes a cell above 0 and scenes of at least 16 pixels are needed (got batch {}, {} anchors, {:?} boxes a cell, size {})",
            cfg.batch_size, cfg.anchors, cfg.v1_boxes, cfg.scenes.size
        )));
    }
    let data_err = |e: kiln_data::DataError| kiln_graph::KilnError::Data(e.to_string());
    let train = ObjectScenes::new(cfg.scenes, ObjectSplit::Train, cfg.seed, (cfg.steps as usize * cfg.batch_size).max(500), cfg.data_dir.as_deref()).map_err(data_err)?;
    let test = ObjectScenes::new(cfg.scenes, ObjectSplit::Test, cfg.seed, cfg.test_scenes, cfg.data_dir.as_deref()).map_err(data_err)?;
    let mut sizes = Vec::new();
    for i in 0..500 {
        sizes.extend(train.scene(i).map_err(data_err)?.objects.iter().map(|o| (o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1])));
    }
    let (layout, anchors, anchor_mean_iou) = match cfg.v1_boxes {
        Some(boxes) => (YoloLayout::V1 { boxes }, Vec::new(), 0.0),
        None => {
            let (anchors, mean_iou) = kmeans_anchors(&sizes, cfg.anchors, cfg.seed);
            (YoloLayout::Anchors(anchors.clone()), anchors, mean_iou)
        }
    };
    let mut vs = VarStore::new(cfg.seed);
    let mut model = Yolo::with_batch_norm(&mut vs, layout, train.classes(), cfg.width, cfg.batch_norm)?;
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, cfg.lr, cfg.steps, Some(10.0))?;
    let (size, s) = (cfg.scenes.size, grid_for(cfg.scenes.size));
    let batch = |set: &ObjectScenes, from: usize, n: usize| -> Result<(Tensor, Vec<kiln_data::ObjectScene>)> {
        let (px, scenes) = set.batch(from, n).map_err(data_err)?;
        Ok((Tensor::from_slice(&px, &[n, 3, size, size])?, scenes))
    };
    // The layout's loss, with the paper's weights: coord 5, noobj 0.5 (YOLOv1's, kept by the anchor form here).
    let loss = |model: &Yolo, pred: &Tensor, scenes: &[kiln_data::ObjectScene]| -> Result<Tensor> {
        let objects = |sc: &kiln_data::ObjectScene| (sc.objects.iter().map(|o| o.bbox).collect::<Vec<_>>(), sc.objects.iter().map(|o| o.class).collect::<Vec<_>>());
        match &model.layout {
            YoloLayout::Anchors(anchors) => {
                let targets: Vec<AnchorTargets> = scenes.iter().map(objects).map(|(b, l)| encode_anchors(&b, &l, (size, size), s, anchors)).collect();
                model.loss(pred, &targets, 5.0, 0.5)
            }
            YoloLayout::V1 { .. } => {
                let targets: Vec<Vec<f32>> = scenes.iter().map(objects).map(|(b, l)| encode_v1(&b, &l, (size, size), s, model.classes)).collect();
                model.loss_v1(pred, &targets, 5.0, 0.5)
            }
        }
    };
    let started = std::time::Instant::now();
    let mut trace = crate::trainer::LossTrace::default();
    for step in 0..cfg.steps {
        let (x, scenes) = batch(&train, step as usize * cfg.batch_size, cfg.batch_size)?;
        let l = loss(&model, &model.forward(&x)?, &scenes)?;
        opt.step(&vs, &l.backward()?)?;
        trace.record(step, &l, &mut progress)?;
        if let Some(path) = crate::trainer::sample_picture_path(cfg.out_dir.as_deref(), cfg.sample_every, step + 1)? {
            model.set_training(false);
            yolo_pictures(&model, cfg, 4, &path)?;
            model.set_training(true);
        }
    }
    let ms_per_step = 1000.0 * started.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    // Scored, saved and drawn with batch norm's running statistics.
    model.set_training(false);
    let (mut dets, mut truths) = (Vec::new(), Vec::new());
    for from in (0..test.len).step_by(cfg.batch_size) {
        let n = cfg.batch_size.min(test.len - from);
        let (x, scenes) = batch(&test, from, n)?;
        let pred = kiln_graph::no_grad(|| model.forward(&x))?;
        for (j, sc) in scenes.iter().enumerate() {
            dets.extend(model.detect(&pred, j, size, 0.01, 0.5)?.into_iter().map(|d| kiln_nn::detection_metrics::Detection { image: from + j, ..d }));
            truths.extend(sc.objects.iter().map(|o| kiln_nn::detection_metrics::GroundTruth { image: from + j, class: o.class, bbox: o.bbox }));
        }
    }
    let map50 = kiln_nn::detection_metrics::voc_map(&dets, &truths, 0.5).0;
    let coco_map = kiln_nn::detection_metrics::coco_eval(&dets, &truths).ap;
    if let Some(dir) = &cfg.out_dir {
        std::fs::create_dir_all(dir).map_err(|e| kiln_graph::KilnError::Io { path: dir.display().to_string(), message: e.to_string() })?;
        save_yolo(&dir.join("yolo.safetensors"), &vs, &model, cfg.width, &YoloInfo { size, class_names: cfg.scenes.source.class_names() })?;
    }
    let layout = model.layout.name();
    Ok((model, YoloReport { layout, steps: cfg.steps, first_loss: trace.first, last_loss: trace.last, anchors, anchor_mean_iou, map50, coco_map, ms_per_step, parameters: vs.num_values() }))
}

/// A PNG of the first `count` held-out scenes of a run, each twice: the true boxes, then the detections that
/// score above 0.3 (class numbers as in `ObjectSource::class_names`).
pub fn yolo_pictures(model: &Yolo, cfg: &YoloConfig, count: usize, path: &std::path::Path) -> Result<()> {
    let data_err = |e: kiln_data::DataError| kiln_graph::KilnError::Data(e.to_string());
    let test = kiln_data::ObjectScenes::new(cfg.scenes, kiln_data::ObjectSplit::Test, cfg.seed, count, cfg.data_dir.as_deref()).map_err(data_err)?;
    let size = cfg.scenes.size;
    let (px, scenes) = test.batch(0, count).map_err(data_err)?;
    let pred = kiln_graph::no_grad(|| model.forward(&Tensor::from_slice(&px, &[count, 3, size, size])?))?;
    let mut panels = Vec::new();
    for (i, sc) in scenes.iter().enumerate() {
        panels.push((&sc.image[..], sc.objects.iter().map(|o| crate::plot::Overlay { bbox: Some(o.bbox), class: o.class, mask: None }).collect()));
        let found = model.detect(&pred, i, size, 0.3, 0.5)?;
        panels.push((&sc.image[..], found.iter().map(|d| crate::plot::Overlay { bbox: Some(d.bbox), class: d.class, mask: None }).collect()));
    }
    crate::plot::scenes_png(path, size, (256 / size).max(1), &panels).map_err(|e| kiln_graph::KilnError::Data(format!("writing {}: {e}", path.display())))
}
