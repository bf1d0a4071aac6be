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

/// Binary cross-entropy from logits, stable for any logit size:
/// mean(max(x, 0) - x*y + log(1 + e^-|x|)).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.shape() != targets.shape() {
        return shape_err("bce_with_logits", logits.shape(), targets.shape(), "logits and targets must match");
    }
    let per = logits.relu()?.sub(&logits.mul(targets)?)?.add(&logits.abs()?.neg()?.softplus()?)?;
    per.mean_all()
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
