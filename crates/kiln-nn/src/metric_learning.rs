//! Metric learning on a batch: triplets mined on the GPU from the batch's distance matrix, and the scores of
//! verification (same or different by a threshold on the distance).
//!
//! Mining follows Hermans, Beyer & Leibe (2017), "In Defense of the Triplet Loss", and FaceNet (Schroff et
//! al. 2015); semi-hard mining is TensorFlow Addons' `triplet_semihard_loss`. Distances are Euclidean
//! ([`kiln_graph::loss::distance_matrix`]). The label masks are built from the labels on the CPU (they are
//! known there); the distances, the choice of each anchor's positive and negative, and the loss run on the
//! GPU as recorded ops, so the gradient flows through the chosen pairs.

use kiln_graph::{KilnError, Result, Tensor};

/// Which triplets of a batch the loss is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mining {
    /// Batch-all: every valid (anchor, positive, negative), averaged over those with a loss above zero.
    All,
    /// Batch-hard: per anchor its farthest positive and nearest negative, averaged over the anchors.
    Hard,
    /// Semi-hard: per (anchor, positive) the nearest negative farther than the positive (the farthest
    /// negative when there is none), averaged over the positive pairs.
    SemiHard,
}

impl Mining {
    pub fn name(&self) -> &'static str {
        match self {
            Mining::All => "batch-all",
            Mining::Hard => "batch-hard",
            Mining::SemiHard => "semi-hard",
        }
    }
}

/// Large enough to never be chosen as a minimum among real distances.
const FAR: f32 = 1e9;

/// The triplet loss of a batch of embeddings [n, d] with their labels, max(d(a, p) - d(a, n) + margin, 0)
/// over the triplets `mining` picks. A batch needs two classes and a class with two samples (else there is no
/// triplet): otherwise an error says what the batch held.
pub fn batch_triplet_loss(embeddings: &Tensor, labels: &[u32], margin: f32, mining: Mining) -> Result<Tensor> {
    let s = embeddings.shape();
    if s.len() != 2 || s[0] != labels.len() {
        return Err(KilnError::Usage(format!("batch_triplet_loss: expects embeddings [n, d] and n labels, got {s:?} and {} labels", labels.len())));
    }
    let n = labels.len();
    let mut classes: Vec<u32> = labels.to_vec();
    classes.sort();
    classes.dedup();
    let paired = classes.iter().any(|c| labels.iter().filter(|&&l| l == *c).count() >= 2);
    if classes.len() < 2 || !paired {
        return Err(KilnError::Usage(format!(
            "batch_triplet_loss: a triplet batch needs at least two classes and a class with two samples; this one has {n} samples of {} class(es){}",
            classes.len(),
            if paired { "" } else { ", none twice" }
        )));
    }
    let dev = embeddings.device();
    let positive: Vec<f32> = (0..n * n).map(|k| (k / n != k % n && labels[k / n] == labels[k % n]) as u8 as f32).collect();
    let negative: Vec<f32> = (0..n * n).map(|k| (labels[k / n] != labels[k % n]) as u8 as f32).collect();
    let pos = Tensor::from_slice_on(dev, &positive, &[n, n])?;
    let neg = Tensor::from_slice_on(dev, &negative, &[n, n])?;
    let d = kiln_graph::loss::distance_matrix(embeddings)?;
    match mining {
        Mining::Hard => {
            let valid: Vec<f32> = (0..n).map(|a| (positive[a * n..(a + 1) * n].contains(&1.0) && negative[a * n..(a + 1) * n].contains(&1.0)) as u8 as f32).collect();
            let count = valid.iter().sum::<f32>();
            let hardest_positive = d.mul(&pos)?.max(1, false)?;
            // The nearest negative: the largest of -(d + FAR where not a negative).
            let hardest_negative = d.add(&neg.affine(-FAR, FAR)?)?.neg()?.max(1, false)?.neg()?;
            let per_anchor = hardest_positive.sub(&hardest_negative)?.add_scalar(margin)?.relu()?;
            per_anchor.mul(&Tensor::from_slice_on(dev, &valid, &[n])?)?.sum_all()?.scale(1.0 / count)
        }
        Mining::All => {
            // [a, p, n]: d(a, p) - d(a, n) + margin, kept where p is a's positive and n its negative.
            let t = d.reshape(&[n, n, 1])?.broadcast_sub(&d.reshape(&[n, 1, n])?)?.add_scalar(margin)?.relu()?;
            let mask = pos.reshape(&[n, n, 1])?.broadcast_mul(&neg.reshape(&[n, 1, n])?)?;
            let losses = t.mul(&mask)?;
            let active = losses.gt_mask(&Tensor::from_slice_on(dev, &[1e-16], &[1, 1, 1])?)?.sum_all()?;
            losses.sum_all()?.div(&active.clamp(1.0, f32::MAX)?)
        }
        Mining::SemiHard => {
            // [a, p, n]: 1 where n is a's negative and farther from a than p is.
            let dn = d.reshape(&[n, 1, n])?;
            let farther = dn.gt_mask(&d.reshape(&[n, n, 1])?)?.broadcast_mul(&neg.reshape(&[n, 1, n])?)?;
            let nearest_farther = dn.broadcast_add(&farther.affine(-FAR, FAR)?)?.neg()?.max(2, false)?.neg()?;
            let has = farther.max(2, false)?;
            let farthest = d.mul(&neg)?.max(1, true)?;
            let chosen = nearest_farther.mul(&has)?.add(&has.affine(-1.0, 1.0)?.broadcast_mul(&farthest)?)?;
            let losses = d.sub(&chosen)?.add_scalar(margin)?.relu()?.mul(&pos)?;
            losses.sum_all()?.scale(1.0 / positive.iter().sum::<f32>())
        }
    }
}

/// The area under the ROC curve for binary labels, as scikit-learn's `roc_auc_score`: the chance that a
/// random positive scores above a random negative, ties counting a half (the Mann-Whitney statistic). None
/// unless both classes are present.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 || scores.len() != positive.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks (1-based) over runs of equal scores; the positives' rank sum gives U.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * order[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        i = j + 1;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// The threshold `t` for "positive when score >= t" with the best accuracy on these scores, and that
/// accuracy. Candidates are each distinct score and one above the largest (everything negative); the first
/// best (the lowest threshold) wins.
pub fn best_threshold(scores: &[f64], positive: &[bool]) -> (f64, f64) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let total_pos = positive.iter().filter(|&&p| p).count();
    let n = scores.len().max(1) as f64;
    // At threshold order[i]'s score: the negatives below it are right, and the positives from it on.
    let (mut best_t, mut best_acc) = (f64::INFINITY, (scores.len() - total_pos) as f64 / n);
    let (mut neg_below, mut pos_below) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let t = scores[order[i]];
        let acc = (neg_below + total_pos - pos_below) as f64 / n;
        if acc > best_acc || (acc == best_acc && t < best_t) {
            best_t = t;
            best_acc = acc;
        }
        while i < order.len() && scores[order[i]] == t {
            if positive[order[i]] {
                pos_below += 1;
            } else {
                neg_below += 1;
            }
            i += 1;
        }
    }
    (best_t, best_acc)
}
