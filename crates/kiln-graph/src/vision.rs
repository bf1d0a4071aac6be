//! Detection ops with torchvision's semantics and argument conventions: RoI-Align
//! (`torchvision.ops.roi_align`), forward and backward on the GPU (shaders/roi.wgsl), with an f64 reference
//! in cpu.rs.

use crate::backprop::Op;
use crate::error::{invalid, Result};
use crate::kernels;
use crate::tensor::{DType, Tensor};

/// torchvision's `roi_align` arguments: `output_size` (height, width), `spatial_scale` (box coordinates to
/// feature-map coordinates, e.g. 1/16), `sampling_ratio` (samples per bin each way; 0 or negative: adaptive,
/// ceil(roi size / output size)), `aligned` (shift the box by half a pixel so that pixel centres sit at +0.5;
/// torchvision's default is false).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoiAlignGeom {
    pub output_size: [usize; 2],
    pub spatial_scale: f32,
    pub sampling_ratio: i32,
    pub aligned: bool,
}

impl RoiAlignGeom {
    pub fn new(output_size: [usize; 2], spatial_scale: f32, sampling_ratio: i32, aligned: bool) -> RoiAlignGeom {
        RoiAlignGeom { output_size, spatial_scale, sampling_ratio, aligned }
    }
}

fn check(op: &'static str, x_shape: &[usize], rois: &Tensor, geom: &RoiAlignGeom) -> Result<()> {
    rois.expect_dtype(op, DType::F32)?;
    if x_shape.len() != 4 || x_shape[2] == 0 || x_shape[3] == 0 {
        return invalid(op, x_shape, "expects the features as [n, c, h, w] with h and w above 0");
    }
    if rois.rank() != 2 || rois.shape()[1] != 5 {
        return invalid(op, rois.shape(), "expects the boxes as [k, 5]: (batch index, x1, y1, x2, y2)");
    }
    if geom.output_size.contains(&0) || !(geom.spatial_scale.is_finite() && geom.spatial_scale > 0.0) {
        return invalid(op, x_shape, format!("output_size {:?} must be positive and spatial_scale {} positive", geom.output_size, geom.spatial_scale));
    }
    Ok(())
}

/// Backward dispatches cover this many RoIs at most on a CPU adapter, whose loops stop after 65,535
/// iterations an invocation (each RoI costs one, plus the samples that can touch a pixel).
fn backward_chunk(x: &Tensor, k: usize, geom: &RoiAlignGeom) -> usize {
    let Some(cap) = kernels::loop_cap(x.device()) else { return k.max(1) };
    // Samples of one axis within a pixel's reach: 2 / step + 4 when sampling is adaptive (the step is at least
    // half a pixel, or the bin holds one sample), all of them (output size x sampling ratio) when it is fixed.
    // The loops count every iteration: the outer one's too.
    let per_axis = |out: usize| if geom.sampling_ratio > 0 { out * geom.sampling_ratio as usize } else { out.max(8) };
    // The innermost loop runs over a block of channels.
    (cap / (1 + per_axis(geom.output_size[0]) * (1 + per_axis(geom.output_size[1]) * (1 + kernels::ROI_CB)))).max(1)
}

/// RoI-Align's forward on a CPU adapter (lavapipe's loop cap): (sample rows of a bin per dispatch, the most
/// sample rows a bin can have inside the map). Adaptive sampling puts samples at least half a pixel apart,
/// so at most 2 (size + 2) + 4 of an axis lie inside; fixed sampling, the ratio. GPUs: one dispatch.
fn forward_band(x: &Tensor, xs: [usize; 4], geom: &RoiAlignGeom) -> (usize, usize) {
    let inside = |size: usize| if geom.sampling_ratio > 0 { geom.sampling_ratio as usize } else { 2 * (size + 2) + 4 };
    let rows = inside(xs[2]);
    match kernels::loop_cap(x.device()) {
        Some(cap) => ((cap / (1 + inside(xs[3]))).max(1), rows),
        None => (rows, rows),
    }
}

impl Tensor {
    /// RoI-Align of the features `self` [n, c, h, w] over `rois` [k, 5] (batch index, x1, y1, x2, y2 in the
    /// input image's coordinates) -> [k, c, ph, pw]: each bin the mean of bilinear samples, exactly as
    /// `torchvision.ops.roi_align`. The gradient flows to the features only (as in torchvision); a batch index
    /// outside [0, n) gives zeros.
    pub fn roi_align(&self, rois: &Tensor, geom: RoiAlignGeom) -> Result<Tensor> {
        self.expect_dtype("roi_align", DType::F32)?;
        check("roi_align", self.shape(), rois, &geom)?;
        let xs = [self.shape()[0], self.shape()[1], self.shape()[2], self.shape()[3]];
        let k = rois.shape()[0];
        let (band, rows) = forward_band(self, xs, &geom);
        let y = kernels::roi_align_forward(&self.view(), &rois.view(), xs, k, &geom, band, rows)?;
        Ok(Tensor::make(y, vec![k, xs[1], geom.output_size[0], geom.output_size[1]], DType::F32, Some(Op::RoiAlign(self.clone(), rois.clone(), geom))))
    }
}

/// RoI-Align's input gradient [n, c, h, w] from `gy` [k, c, ph, pw], recorded (Op::RoiAlignGrad) so that a
/// gradient of it is RoI-Align again.
pub fn roi_align_grad(gy: &Tensor, rois: &Tensor, geom: &RoiAlignGeom, x_shape: &[usize]) -> Result<Tensor> {
    check("roi_align", x_shape, rois, geom)?;
    let xs = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
    let k = rois.shape()[0];
    let want = [k, xs[1], geom.output_size[0], geom.output_size[1]];
    if gy.shape() != want {
        return crate::error::shape_err("roi_align backward", gy.shape(), &want, "the gradient must have the output's shape");
    }
    let dx = kernels::roi_align_backward(&gy.view(), &rois.view(), xs, k, geom, backward_chunk(gy, k, geom))?;
    Ok(Tensor::make(dx, x_shape.to_vec(), DType::F32, Some(Op::RoiAlignGrad(gy.clone(), rois.clone(), *geom, x_shape.to_vec()))))
}

impl Tensor {
    /// RoI max pooling of the features `self` [n, c, h, w] over `rois` [k, 5] -> [k, c, ph, pw], exactly
    /// `torchvision.ops.roi_pool(input, boxes, output_size, spatial_scale)`: corners scaled and rounded (half
    /// away from zero), boxes at least 1 x 1, bin i of a box covering [floor(i b), ceil((i + 1) b)) of it;
    /// an empty bin (a box off the image) gives 0. The gradient goes to each bin's first maximum (row-major).
    pub fn roi_pool(&self, rois: &Tensor, output_size: [usize; 2], spatial_scale: f32) -> Result<Tensor> {
        self.expect_dtype("roi_pool", DType::F32)?;
        let geom = RoiAlignGeom::new(output_size, spatial_scale, 0, false);
        check("roi_pool", self.shape(), rois, &geom)?;
        let xs = [self.shape()[0], self.shape()[1], self.shape()[2], self.shape()[3]];
        let k = rois.shape()[0];
        // A bin can span the whole map: on CPU adapters (lavapipe's loop cap) each dispatch scans a band of
        // rows whose pixels stay under 60,000 per bin.
        let band = kernels::loop_cap(self.device()).map_or(xs[2].max(1), |cap| (cap / xs[3].max(1)).max(1));
        let (y, arg) = kernels::roi_pool_forward(&self.view(), &rois.view(), xs, k, &geom, band)?;
        let shape = vec![k, xs[1], output_size[0], output_size[1]];
        let argmax = Tensor::make(arg, shape.clone(), DType::U32, None);
        Ok(Tensor::make(y, shape, DType::F32, Some(Op::RoiPool(self.clone(), rois.clone(), argmax, geom))))
    }
}

/// RoI pooling's input gradient [n, c, h, w]: `gy` [k, c, ph, pw] added up at each bin's argmax, recorded
/// (Op::RoiPoolGrad).
pub fn roi_pool_grad(gy: &Tensor, rois: &Tensor, argmax: &Tensor, geom: &RoiAlignGeom, x_shape: &[usize]) -> Result<Tensor> {
    let xs = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
    let k = rois.shape()[0];
    // Each RoI costs one iteration, and the bins within reach of a pixel a few more.
    let chunk = kernels::loop_cap(gy.device()).map_or(k.max(1), |cap| (cap / (1 + (geom.output_size[0] + 3) * (geom.output_size[1] + 3))).max(1));
    let dx = kernels::roi_pool_backward(&gy.view(), &rois.view(), &argmax.view(), xs, k, geom, chunk)?;
    Ok(Tensor::make(dx, x_shape.to_vec(), DType::F32, Some(Op::RoiPoolGrad(gy.clone(), rois.clone(), argmax.clone(), *geom, x_shape.to_vec()))))
}

/// `src` [n, c, h, w] read at RoI pooling's argmax -> [k, c, ph, pw] (the gradient's adjoint), recorded as a
/// RoI pooling with those switches.
pub fn roi_pool_gather(src: &Tensor, rois: &Tensor, argmax: &Tensor, geom: &RoiAlignGeom) -> Result<Tensor> {
    let s = src.shape();
    let xs = [s[0], s[1], s[2], s[3]];
    let y = kernels::roi_pool_gather(&src.view(), &rois.view(), &argmax.view(), xs, rois.shape()[0], geom)?;
    Ok(Tensor::make(y, argmax.shape().to_vec(), DType::F32, Some(Op::RoiPool(src.clone(), rois.clone(), argmax.clone(), *geom))))
}

// ---- Boxes: (x1, y1, x2, y2) rows, torchvision's conventions, as recorded tensor ops (so differentiable:
// GIoU and box regression losses train through them). References in cpu.rs.

fn check_boxes(op: &'static str, b: &Tensor) -> Result<()> {
    b.expect_dtype(op, DType::F32)?;
    if b.rank() != 2 || b.shape()[1] != 4 {
        return invalid(op, b.shape(), "expects boxes as [n, 4]: (x1, y1, x2, y2)");
    }
    Ok(())
}

/// Column `i` of boxes [n, 4], as [n, 1].
fn col(b: &Tensor, i: usize) -> Result<Tensor> {
    b.slice(1, i, 1)
}

/// (x2 - x1) * (y2 - y1) of boxes [n, 4] -> [n] (`torchvision.ops.box_area`).
pub fn box_area(boxes: &Tensor) -> Result<Tensor> {
    check_boxes("box_area", boxes)?;
    col(boxes, 2)?.sub(&col(boxes, 0)?)?.mul(&col(boxes, 3)?.sub(&col(boxes, 1)?)?)?.reshape(&[boxes.shape()[0]])
}

/// The intersections [n, m] and unions [n, m] of every pair of a [n, 4] and b [m, 4].
fn inter_union(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, m) = (a.shape()[0], b.shape()[0]);
    let bt = b.transpose(0, 1)?; // [4, m]
    let a_col = |i| col(a, i); // [n, 1]
    let b_row = |i: usize| bt.slice(0, i, 1); // [1, m]
    let w = a_col(2)?.broadcast_minimum(&b_row(2)?)?.broadcast_sub(&a_col(0)?.broadcast_maximum(&b_row(0)?)?)?.clamp(0.0, f32::MAX)?;
    let h = a_col(3)?.broadcast_minimum(&b_row(3)?)?.broadcast_sub(&a_col(1)?.broadcast_maximum(&b_row(1)?)?)?.clamp(0.0, f32::MAX)?;
    let inter = w.mul(&h)?;
    let union = box_area(a)?.reshape(&[n, 1])?.broadcast_add(&box_area(b)?.reshape(&[1, m])?)?.sub(&inter)?;
    Ok((inter, union))
}

/// Intersection over union of every pair, [n, m] (`torchvision.ops.box_iou`).
pub fn box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_boxes("box_iou", a)?;
    check_boxes("box_iou", b)?;
    let (inter, union) = inter_union(a, b)?;
    inter.div(&union)
}

/// Generalized IoU of every pair, [n, m]: IoU - (C - union) / C with C the smallest box around both
/// (`torchvision.ops.generalized_box_iou`, Rezatofighi et al. 2019).
pub fn generalized_box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_boxes("generalized_box_iou", a)?;
    check_boxes("generalized_box_iou", b)?;
    let (inter, union) = inter_union(a, b)?;
    let bt = b.transpose(0, 1)?;
    let (a_col, b_row) = (|i| col(a, i), |i: usize| bt.slice(0, i, 1));
    let w = a_col(2)?.broadcast_maximum(&b_row(2)?)?.broadcast_sub(&a_col(0)?.broadcast_minimum(&b_row(0)?)?)?.clamp(0.0, f32::MAX)?;
    let h = a_col(3)?.broadcast_maximum(&b_row(3)?)?.broadcast_sub(&a_col(1)?.broadcast_minimum(&b_row(1)?)?)?.clamp(0.0, f32::MAX)?;
    let hull = w.mul(&h)?;
    inter.div(&union)?.sub(&hull.sub(&union)?.div(&hull)?)
}

/// Boxes clamped to an image of `size` (height, width): x into [0, width], y into [0, height]
/// (`torchvision.ops.clip_boxes_to_image`).
pub fn clip_boxes_to_image(boxes: &Tensor, size: [usize; 2]) -> Result<Tensor> {
    check_boxes("clip_boxes_to_image", boxes)?;
    let (h, w) = (size[0] as f32, size[1] as f32);
    let parts = [col(boxes, 0)?.clamp(0.0, w)?, col(boxes, 1)?.clamp(0.0, h)?, col(boxes, 2)?.clamp(0.0, w)?, col(boxes, 3)?.clamp(0.0, h)?];
    Tensor::concat(&parts.iter().collect::<Vec<_>>(), 1)
}

/// Boxes of an image of size `from` (height, width) in the coordinates of the same image resized to `to`:
/// x times to_w / from_w, y times to_h / from_h (torchvision's detection transform `resize_boxes`).
pub fn resize_boxes(boxes: &Tensor, from: [usize; 2], to: [usize; 2]) -> Result<Tensor> {
    check_boxes("resize_boxes", boxes)?;
    let (sy, sx) = (to[0] as f32 / from[0] as f32, to[1] as f32 / from[1] as f32);
    let factors = Tensor::from_slice_on(boxes.device(), &[sx, sy, sx, sy], &[1, 4])?;
    boxes.broadcast_mul(&factors)
}

/// Faster R-CNN's box coding (torchvision's `BoxCoder`): a box relative to a reference box as
/// (dx, dy, dw, dh) = (wx (x - xa) / wa, wy (y - ya) / ha, ww log(w / wa), wh log(h / ha)) of centres and sizes.
/// Decoding clamps dw and dh at `clip` (log(1000 / 16) by default) before the exponential.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxCoder {
    pub weights: [f32; 4],
    pub clip: f32,
}

impl BoxCoder {
    pub fn new(weights: [f32; 4]) -> BoxCoder {
        BoxCoder { weights, clip: (1000.0f32 / 16.0).ln() }
    }

    /// (centre x, centre y, width, height), each [n, 1].
    fn centres(b: &Tensor) -> Result<[Tensor; 4]> {
        let w = col(b, 2)?.sub(&col(b, 0)?)?;
        let h = col(b, 3)?.sub(&col(b, 1)?)?;
        Ok([col(b, 0)?.add(&w.scale(0.5)?)?, col(b, 1)?.add(&h.scale(0.5)?)?, w, h])
    }

    /// The deltas [n, 4] that take `proposals` [n, 4] to `reference` [n, 4] (torchvision's `encode_single`).
    pub fn encode(&self, reference: &Tensor, proposals: &Tensor) -> Result<Tensor> {
        check_boxes("BoxCoder::encode", reference)?;
        check_boxes("BoxCoder::encode", proposals)?;
        if reference.shape() != proposals.shape() {
            return crate::error::shape_err("BoxCoder::encode", reference.shape(), proposals.shape(), "one reference box per proposal");
        }
        let [gx, gy, gw, gh] = Self::centres(reference)?;
        let [px, py, pw, ph] = Self::centres(proposals)?;
        let [wx, wy, ww, wh] = self.weights;
        let parts = [gx.sub(&px)?.div(&pw)?.scale(wx)?, gy.sub(&py)?.div(&ph)?.scale(wy)?, gw.div(&pw)?.log()?.scale(ww)?, gh.div(&ph)?.log()?.scale(wh)?];
        Tensor::concat(&parts.iter().collect::<Vec<_>>(), 1)
    }

    /// The boxes [n, 4] that `deltas` [n, 4] make of `boxes` [n, 4] (torchvision's `decode_single`).
    pub fn decode(&self, deltas: &Tensor, boxes: &Tensor) -> Result<Tensor> {
        check_boxes("BoxCoder::decode", deltas)?;
        check_boxes("BoxCoder::decode", boxes)?;
        if deltas.shape() != boxes.shape() {
            return crate::error::shape_err("BoxCoder::decode", deltas.shape(), boxes.shape(), "one delta row per box");
        }
        let [cx, cy, w, h] = Self::centres(boxes)?;
        let [wx, wy, ww, wh] = self.weights;
        let d = |i: usize, weight: f32| col(deltas, i)?.scale(1.0 / weight);
        let x = d(0, wx)?.mul(&w)?.add(&cx)?;
        let y = d(1, wy)?.mul(&h)?.add(&cy)?;
        let half_w = d(2, ww)?.clamp(f32::MIN, self.clip)?.exp()?.mul(&w)?.scale(0.5)?;
        let half_h = d(3, wh)?.clamp(f32::MIN, self.clip)?.exp()?.mul(&h)?.scale(0.5)?;
        let parts = [x.sub(&half_w)?, y.sub(&half_h)?, x.add(&half_w)?, y.add(&half_h)?];
        Tensor::concat(&parts.iter().collect::<Vec<_>>(), 1)
    }
}

// ---- Non-maximum suppression.

/// What [`nms_fixed`] keeps. torchvision's `nms` is `NmsOptions::torchvision(iou)`: every box a candidate,
/// suppressed above the IoU threshold, no limit. The course's defaults ([`NmsOptions::default`]): boxes
/// scoring at most 0.6 dropped, suppressed at IoU 0.5 and above.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NmsOptions {
    pub iou_threshold: f32,
    /// Boxes scoring at or below it are never kept.
    pub score_threshold: Option<f32>,
    /// Keep at most this many (top-k).
    pub max_keep: Option<usize>,
    /// Suppress at IoU equal to the threshold too (torchvision suppresses only above it).
    pub suppress_equal: bool,
}

impl Default for NmsOptions {
    fn default() -> Self {
        NmsOptions { iou_threshold: 0.5, score_threshold: Some(0.6), max_keep: None, suppress_equal: true }
    }
}

impl NmsOptions {
    pub fn torchvision(iou_threshold: f32) -> NmsOptions {
        NmsOptions { iou_threshold, score_threshold: None, max_keep: None, suppress_equal: false }
    }
}

/// Greedy non-maximum suppression on the GPU, with outputs of fixed size so a training step stays one
/// submission: (keep [n] u32: the kept boxes' indices by descending score (ties by index), then n; count [1]
/// u32). boxes [n, 4] (x1, y1, x2, y2), scores [n]; with `classes` [n] (u32) boxes suppress only boxes of
/// their own class (torchvision's `batched_nms`). NaN scores are never kept; boxes with NaN coordinates
/// suppress nothing.
pub fn nms_fixed(boxes: &Tensor, scores: &Tensor, classes: Option<&Tensor>, opts: NmsOptions) -> Result<(Tensor, Tensor)> {
    nms_fixed_capped(boxes, scores, classes, opts, kernels::loop_cap(boxes.device()))
}

/// [`nms_fixed`] with each GPU invocation's loops kept under `loop_cap` iterations (more, smaller
/// dispatches): what CPU adapters get (60,000; lavapipe stops at 65,535), and for adapters with a watchdog.
pub fn nms_fixed_capped(boxes: &Tensor, scores: &Tensor, classes: Option<&Tensor>, opts: NmsOptions, loop_cap: Option<usize>) -> Result<(Tensor, Tensor)> {
    check_boxes("nms", boxes)?;
    scores.expect_dtype("nms", DType::F32)?;
    let n = boxes.shape()[0];
    if scores.shape() != [n] {
        return crate::error::shape_err("nms", boxes.shape(), scores.shape(), "one score per box ([n, 4] boxes, [n] scores)");
    }
    if let Some(c) = classes {
        c.expect_dtype("nms", DType::U32)?;
        if c.shape() != [n] {
            return crate::error::shape_err("nms", boxes.shape(), c.shape(), "one class per box ([n, 4] boxes, [n] classes)");
        }
    }
    if !opts.iou_threshold.is_finite() {
        return invalid("nms", boxes.shape(), format!("iou_threshold {} is not a number", opts.iou_threshold));
    }
    if n == 0 {
        let none = Tensor::from_u32_on(boxes.device(), &[], &[0])?;
        return Ok((none, Tensor::from_u32_on(boxes.device(), &[0], &[1])?));
    }
    let spec = kernels::NmsSpec { n, iou: opts.iou_threshold, score: opts.score_threshold, max_keep: opts.max_keep.unwrap_or(n).min(n), inclusive: opts.suppress_equal };
    let (keep, count) = kernels::nms(&boxes.view(), &scores.view(), classes.map(|c| c.view()).as_ref(), spec, loop_cap)?;
    Ok((Tensor::make(keep, vec![n], DType::U32, None), Tensor::make(count, vec![1], DType::U32, None)))
}

/// The kept boxes' indices, by descending score: [`nms_fixed`] read back.
pub fn nms_with(boxes: &Tensor, scores: &Tensor, classes: Option<&Tensor>, opts: NmsOptions) -> Result<Vec<u32>> {
    let (keep, count) = nms_fixed(boxes, scores, classes, opts)?;
    let count = count.to_vec_u32()?[0] as usize;
    let mut keep = keep.to_vec_u32()?;
    keep.truncate(count);
    Ok(keep)
}

/// `torchvision.ops.nms(boxes, scores, iou_threshold)`.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f32) -> Result<Vec<u32>> {
    nms_with(boxes, scores, None, NmsOptions::torchvision(iou_threshold))
}

/// `torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)`: boxes suppress only their own class.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, classes: &Tensor, iou_threshold: f32) -> Result<Vec<u32>> {
    nms_with(boxes, scores, Some(classes), NmsOptions::torchvision(iou_threshold))
}

// ---- Resampling for segmentation decoders: unpooling and upsampling, as recorded ops.

impl Tensor {
    /// PyTorch's `max_unpool2d`: the values `self` [n, c, ph, pw] written into zeros of `output_size` (h, w)
    /// at `indices` [n, c, ph, pw] (u32 positions in each output plane: the switches `max_pool2d` returns), as
    /// SegNet's decoder reuses its encoder's switches. Indices that repeat (overlapping windows) add up. The
    /// gradient reads the output's gradient back at the switches.
    pub fn max_unpool2d(&self, indices: &Tensor, geom: crate::Pool2dGeom, output_size: [usize; 2]) -> Result<Tensor> {
        self.expect_dtype("max_unpool2d", DType::F32)?;
        indices.expect_dtype("max_unpool2d", DType::U32)?;
        if self.rank() != 4 || indices.shape() != self.shape() {
            return crate::error::shape_err("max_unpool2d", self.shape(), indices.shape(), "expects values and indices of one shape [n, c, h, w]");
        }
        let s = self.shape();
        match geom.output_size(output_size[0], output_size[1]) {
            Some((h, w)) if h == s[2] && w == s[3] => {}
            _ => return invalid("max_unpool2d", s, format!("output_size {output_size:?} does not pool to [{}, {}] with {geom:?}", s[2], s[3])),
        }
        crate::backprop::max_pool2d_grad(self, indices, &geom, &[s[0], s[1], output_size[0], output_size[1]])
    }

    /// PyTorch's `interpolate(mode="nearest")` to `size` (h, w): source row floor(dst * in / out), each axis.
    pub fn upsample_nearest2d(&self, size: [usize; 2]) -> Result<Tensor> {
        let (h, w) = self.check_resample("upsample_nearest2d", size)?;
        let pick = |inp: usize, out: usize| -> Vec<u32> { (0..out).map(|d| ((d as f32 * (inp as f32 / out as f32)).floor() as usize).min(inp - 1) as u32).collect() };
        let dev = self.device();
        let rows = Tensor::from_u32_on(dev, &pick(h, size[0]), &[size[0]])?;
        let cols = Tensor::from_u32_on(dev, &pick(w, size[1]), &[size[1]])?;
        self.index_select(2, &rows)?.index_select(3, &cols)
    }

    /// PyTorch's `interpolate(mode="bilinear")` to `size` (h, w), with `align_corners` either way: each axis
    /// a linear interpolation between two source rows (index_select, so the gradient scatters back).
    pub fn upsample_bilinear2d(&self, size: [usize; 2], align_corners: bool) -> Result<Tensor> {
        let (h, w) = self.check_resample("upsample_bilinear2d", size)?;
        let mut x = self.clone();
        for (axis, inp, out) in [(2usize, h, size[0]), (3, w, size[1])] {
            let (lo, hi, frac) = linear_taps(inp, out, align_corners);
            let dev = self.device();
            let mut shape = [1usize; 4];
            shape[axis] = out;
            let f = Tensor::from_slice_on(dev, &frac, &shape)?;
            let a = x.index_select(axis, &Tensor::from_u32_on(dev, &lo, &[out])?)?;
            let b = x.index_select(axis, &Tensor::from_u32_on(dev, &hi, &[out])?)?;
            // a + (b - a) frac
            x = a.add(&b.sub(&a)?.broadcast_mul(&f)?)?;
        }
        Ok(x)
    }

    fn check_resample(&self, op: &'static str, size: [usize; 2]) -> Result<(usize, usize)> {
        self.expect_dtype(op, DType::F32)?;
        if self.rank() != 4 || size.contains(&0) || self.shape()[2] == 0 || self.shape()[3] == 0 {
            return invalid(op, self.shape(), format!("expects [n, c, h, w] with h, w > 0 and a positive size (got {size:?})"));
        }
        Ok((self.shape()[2], self.shape()[3]))
    }
}

/// PyTorch's source taps for linear interpolation from `inp` to `out` samples: (low index, high index,
/// weight of the high one) per output sample (area_pixel_compute_source_index).
pub fn linear_taps(inp: usize, out: usize, align_corners: bool) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let mut taps = (Vec::with_capacity(out), Vec::with_capacity(out), Vec::with_capacity(out));
    for d in 0..out {
        let src = if align_corners {
            if out > 1 {
                d as f32 * ((inp - 1) as f32 / (out - 1) as f32)
            } else {
                0.0
            }
        } else {
            ((d as f32 + 0.5) * (inp as f32 / out as f32) - 0.5).max(0.0)
        };
        let lo = (src as usize).min(inp - 1);
        let hi = if lo < inp - 1 { lo + 1 } else { lo };
        taps.0.push(lo as u32);
        taps.1.push(hi as u32);
        taps.2.push(src - lo as f32);
    }
    taps
}
