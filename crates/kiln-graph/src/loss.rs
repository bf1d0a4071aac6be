//! Losses, composed from primitive ops (so their gradients come from the rules in backprop.rs).

use crate::backprop::Op;
use crate::error::{shape_err, Result};
use crate::kernels;
use crate::tensor::{DType, Tensor};

/// Mean squared error: mean((pred - target)^2).
pub fn mse_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.shape() != target.shape() {
        return shape_err("mse_loss", pred.shape(), target.shape(), "prediction and target must match");
    }
    let d = pred.sub(target)?;
    d.mul(&d)?.mean_all()
}

/// Binary cross-entropy from logits, stable for any logit size: mean(softplus(x) - x*y), softplus computed as
/// max(x, 0) + log(1 + e^-|x|). Its gradient is sigmoid(x) - y everywhere, x = 0 included (the same value
/// written as relu(x) - x y + softplus(-|x|) has kinks whose subgradients do not cancel at 0).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.shape() != targets.shape() {
        return shape_err("bce_with_logits", logits.shape(), targets.shape(), "logits and targets must match");
    }
    logits.softplus()?.sub(&logits.mul(targets)?)?.mean_all()
}

/// Softmax cross-entropy from logits [n, classes] and class indices [n] (u32), averaged over n.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    labels.expect_dtype("cross_entropy", DType::U32)?;
    if logits.rank() != 2 || labels.rank() != 1 || labels.shape()[0] != logits.shape()[0] {
        return shape_err("cross_entropy", logits.shape(), labels.shape(), "expects logits [n, classes] and labels [n]");
    }
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    if rows == 0 || classes == 0 || classes > kernels::CROSS_ENTROPY_MAX_CLASSES || !crate::fusion_enabled(logits.device()) {
        let one_hot = Tensor::one_hot(labels, classes)?;
        return cross_entropy_one_hot(logits, &one_hot);
    }
    logits.expect_dtype("cross_entropy", DType::F32)?;
    // Fused: per-row losses and log-sum-exps in one kernel, their mean in a reduction; the backward rule
    // (Op::CrossEntropy) is one kernel.
    let (loss_rows, lse) = kernels::cross_entropy_forward(&logits.view(), &labels.view(), rows, classes)?;
    let lse = Tensor::make(lse, vec![rows], DType::F32, None);
    let mean = kernels::reduce(&loss_rows, 1, rows, 1, false, 1.0 / rows as f32)?;
    Ok(Tensor::make(mean, vec![], DType::F32, Some(Op::CrossEntropy(logits.clone(), labels.clone(), lse))))
}

/// PyTorch's `ignore_index` and `label_smoothing` of [`cross_entropy_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows with this label add nothing and are not counted in the mean (padding in a batch of sequences).
    pub ignore_index: Option<u32>,
    /// eps in [0, 1]: the target is (1 - eps) on the label plus eps / classes on every class.
    pub label_smoothing: f32,
}

/// Softmax cross-entropy with PyTorch's options: the mean over the rows not ignored of -sum_j q_j log p_j, q the
/// (smoothed) target. Every row ignored gives NaN (0 / 0), as PyTorch. Without options it is
/// [`cross_entropy`] (fused); with them, log-softmax times the targets (softmax.wgsl's ce_targets).
pub fn cross_entropy_with(logits: &Tensor, labels: &Tensor, opts: CrossEntropyOptions) -> Result<Tensor> {
    if opts.ignore_index.is_none() && opts.label_smoothing == 0.0 {
        return cross_entropy(logits, labels);
    }
    labels.expect_dtype("cross_entropy", DType::U32)?;
    logits.expect_dtype("cross_entropy", DType::F32)?;
    if logits.rank() != 2 || labels.rank() != 1 || labels.shape()[0] != logits.shape()[0] {
        return shape_err("cross_entropy", logits.shape(), labels.shape(), "expects logits [n, classes] and labels [n]");
    }
    if !(0.0..=1.0).contains(&opts.label_smoothing) {
        return Err(crate::error::KilnError::Usage(format!("cross_entropy: label_smoothing must be in [0, 1], got {}", opts.label_smoothing)));
    }
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    let q = kernels::ce_targets(&labels.view(), rows, classes, opts.ignore_index, opts.label_smoothing)?;
    let q = Tensor::make(q, vec![rows, classes], DType::F32, None);
    let counted = q.sum_all()?;
    logits.log_softmax(1)?.mul(&q)?.sum_all()?.neg()?.div(&counted)
}

/// Softmax cross-entropy from logits [n, classes] and target distributions of the same shape (one-hot or soft).
pub fn cross_entropy_one_hot(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.rank() != 2 || logits.shape() != targets.shape() {
        return shape_err("cross_entropy_one_hot", logits.shape(), targets.shape(), "expects two [n, classes] tensors");
    }
    let n = logits.shape()[0].max(1) as f32;
    logits.log_softmax(1)?.mul(targets)?.sum_all()?.scale(-1.0 / n)
}

/// [`cross_entropy_with`] with a weight per class [classes] (PyTorch's `weight`): the sum over rows not
/// ignored of their weighted losses, over the sum of their labels' weights. With label smoothing each class's
/// share of the target carries its own weight, as PyTorch computes it.
pub fn cross_entropy_weighted(logits: &Tensor, labels: &Tensor, weight: &Tensor, opts: CrossEntropyOptions) -> Result<Tensor> {
    labels.expect_dtype("cross_entropy", DType::U32)?;
    logits.expect_dtype("cross_entropy", DType::F32)?;
    if logits.rank() != 2 || labels.rank() != 1 || labels.shape()[0] != logits.shape()[0] {
        return shape_err("cross_entropy", logits.shape(), labels.shape(), "expects logits [n, classes] and labels [n]");
    }
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    if weight.shape() != [classes] {
        return shape_err("cross_entropy", logits.shape(), weight.shape(), "expects one weight per class");
    }
    if !(0.0..=1.0).contains(&opts.label_smoothing) {
        return Err(crate::error::KilnError::Usage(format!("cross_entropy: label_smoothing must be in [0, 1], got {}", opts.label_smoothing)));
    }
    let w = weight.reshape(&[1, classes])?;
    let q = Tensor::make(kernels::ce_targets(&labels.view(), rows, classes, opts.ignore_index, opts.label_smoothing)?, vec![rows, classes], DType::F32, None);
    let picked = Tensor::make(kernels::ce_targets(&labels.view(), rows, classes, opts.ignore_index, 0.0)?, vec![rows, classes], DType::F32, None);
    let counted = picked.broadcast_mul(&w)?.sum_all()?;
    logits.log_softmax(1)?.mul(&q.broadcast_mul(&w)?)?.sum_all()?.neg()?.div(&counted)
}

/// PyTorch's `cross_entropy` on images: logits [n, classes, h, w] and labels [n, h, w] (u32), every pixel a
/// row; optional class weights, `ignore_index` (unlabelled pixels) and label smoothing.
pub fn pixel_cross_entropy(logits: &Tensor, labels: &Tensor, weight: Option<&Tensor>, opts: CrossEntropyOptions) -> Result<Tensor> {
    let (l, y) = (logits.shape(), labels.shape());
    if l.len() != 4 || y.len() != 3 || l[0] != y[0] || l[2..] != y[1..] {
        return shape_err("pixel_cross_entropy", l, y, "expects logits [n, classes, h, w] and labels [n, h, w]");
    }
    let rows = logits.permute(&[0, 2, 3, 1])?.reshape(&[l[0] * l[2] * l[3], l[1]])?;
    let labels = labels.reshape(&[y.iter().product()])?;
    match weight {
        Some(w) => cross_entropy_weighted(&rows, &labels, w, opts),
        None if opts.ignore_index.is_none() && opts.label_smoothing == 0.0 => cross_entropy(&rows, &labels),
        None => cross_entropy_with(&rows, &labels, opts),
    }
}

/// PyTorch's `smooth_l1_loss` (mean): 0.5 d^2 / beta where |d| < beta, |d| - 0.5 beta elsewhere; beta 0 is
/// the L1 loss.
pub fn smooth_l1_loss(pred: &Tensor, target: &Tensor, beta: f32) -> Result<Tensor> {
    if pred.shape() != target.shape() {
        return shape_err("smooth_l1_loss", pred.shape(), target.shape(), "prediction and target must match");
    }
    let a = pred.sub(target)?.abs()?;
    if beta <= 0.0 {
        return a.mean_all();
    }
    // min(|d|, beta) = m: 0.5 m^2 / beta + (|d| - m) is both branches at once.
    let m = a.clamp(0.0, beta)?;
    m.mul(&m)?.scale(0.5 / beta)?.add(&a.sub(&m)?)?.mean_all()
}

/// torchvision's `sigmoid_focal_loss` (Lin et al. 2017) with reduction "mean": BCE(x, t) (1 - p_t)^gamma,
/// p_t = p t + (1 - p)(1 - t), times alpha t + (1 - alpha)(1 - t) when alpha >= 0.
pub fn sigmoid_focal_loss(logits: &Tensor, targets: &Tensor, alpha: f32, gamma: f32) -> Result<Tensor> {
    if logits.shape() != targets.shape() {
        return shape_err("sigmoid_focal_loss", logits.shape(), targets.shape(), "logits and targets must match");
    }
    let p = logits.sigmoid()?;
    let ce = logits.softplus()?.sub(&logits.mul(targets)?)?;
    // 1 - p_t = p + t - 2 p t
    let one_minus_pt = p.add(targets)?.sub(&p.mul(targets)?.scale(2.0)?)?;
    let mut loss = ce.mul(&one_minus_pt.clamp(0.0, 1.0)?.powf(gamma)?)?;
    if alpha >= 0.0 {
        loss = loss.mul(&targets.affine(2.0 * alpha - 1.0, 1.0 - alpha)?)?;
    }
    loss.mean_all()
}

/// Soft Dice loss over classes: probabilities [n, classes, h, w] (a softmax) against one-hot targets of the
/// same shape; per class 1 - (2 sum(p t) + eps) / (sum p + sum t + eps) over the batch and pixels, averaged
/// over the classes (eps keeps an absent class at a loss of 0 rather than 0 / 0).
pub fn dice_loss(probs: &Tensor, targets: &Tensor, eps: f32) -> Result<Tensor> {
    if probs.rank() != 4 || probs.shape() != targets.shape() {
        return shape_err("dice_loss", probs.shape(), targets.shape(), "expects probabilities and one-hot targets, both [n, classes, h, w]");
    }
    let axes = [0, 2, 3];
    let inter = probs.mul(targets)?.sum(&axes, false)?;
    let total = probs.sum(&axes, false)?.add(&targets.sum(&axes, false)?)?;
    inter.scale(2.0)?.add_scalar(eps)?.div(&total.add_scalar(eps)?)?.affine(-1.0, 1.0)?.mean_all()
}

// ---- Metric learning: distances between embeddings and the losses that pull and push them.

/// PyTorch's `pairwise_distance(x1, x2, p=2, eps)`: the Euclidean norm of `x1 - x2 + eps` per row, [n, d] and
/// [n, d] -> [n] (the eps inside keeps the gradient finite when two rows coincide).
pub fn pairwise_distance(x1: &Tensor, x2: &Tensor, eps: f32) -> Result<Tensor> {
    if x1.rank() != 2 || x1.shape() != x2.shape() {
        return shape_err("pairwise_distance", x1.shape(), x2.shape(), "expects two [n, d] tensors");
    }
    let d = x1.sub(x2)?.add_scalar(eps)?;
    d.mul(&d)?.sum(&[1], false)?.sqrt()
}

/// PyTorch's `triplet_margin_loss(anchor, positive, negative, margin, p=2, eps=1e-6, swap, reduction="mean")`:
/// mean of max(d(a, p) - d(a, n) + margin, 0) with [`pairwise_distance`]; `swap` (Balntas et al. 2016) uses
/// min(d(a, n), d(p, n)) as the negative's distance.
pub fn triplet_margin_loss(anchor: &Tensor, positive: &Tensor, negative: &Tensor, margin: f32, swap: bool) -> Result<Tensor> {
    for (name, t) in [("positive", positive), ("negative", negative)] {
        if t.shape() != anchor.shape() || anchor.rank() != 2 {
            return shape_err("triplet_margin_loss", anchor.shape(), t.shape(), format!("anchor and {name} must both be [n, d]"));
        }
    }
    let d_ap = pairwise_distance(anchor, positive, 1e-6)?;
    let mut d_an = pairwise_distance(anchor, negative, 1e-6)?;
    if swap {
        d_an = d_an.broadcast_minimum(&pairwise_distance(positive, negative, 1e-6)?)?;
    }
    d_ap.sub(&d_an)?.add_scalar(margin)?.relu()?.mean_all()
}

/// The contrastive loss of Hadsell, Chopra & LeCun (2006) over pairs: with d = [`pairwise_distance`]
/// (eps 1e-6) and `same` [n] 1 for a pair of one class, 0 otherwise, the mean over pairs of
/// 0.5 (same d^2 + (1 - same) max(margin - d, 0)^2).
pub fn contrastive_loss(x1: &Tensor, x2: &Tensor, same: &Tensor, margin: f32) -> Result<Tensor> {
    let d = pairwise_distance(x1, x2, 1e-6)?;
    if same.shape() != d.shape() {
        return shape_err("contrastive_loss", x1.shape(), same.shape(), "expects one 0/1 label per pair: [n, d] embeddings and [n] labels");
    }
    let pull = d.mul(&d)?.mul(same)?;
    let hinge = d.affine(-1.0, margin)?.relu()?;
    let push = hinge.mul(&hinge)?.mul(&same.affine(-1.0, 1.0)?)?;
    pull.add(&push)?.scale(0.5)?.mean_all()
}

/// Euclidean distances between every pair of rows of `x` [n, d] -> [n, n], from |a|^2 + |b|^2 - 2 a.b on
/// the GPU's matrix product. Squared distances are floored at 1e-12 before the root, so the diagonal (and
/// duplicates) give 1e-6 with a zero gradient rather than the root's infinite one.
pub fn distance_matrix(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 2 {
        return shape_err("distance_matrix", x.shape(), &[0, 0], "expects embeddings [n, d]");
    }
    let n = x.shape()[0];
    let sq = x.mul(x)?.sum(&[1], true)?;
    let gram = x.matmul_t(x, false, true)?;
    sq.broadcast_add(&sq.reshape(&[1, n])?)?.sub(&gram.scale(2.0)?)?.clamp(1e-12, f32::MAX)?.sqrt()
}
