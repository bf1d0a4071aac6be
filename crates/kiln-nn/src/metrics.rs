//! Evaluation metrics on host values.

/// Fraction of predictions equal to the labels.
pub fn accuracy(pred: &[u32], labels: &[u32]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
}

/// Row-major [classes, classes]: entry [true][predicted].
pub fn confusion_matrix(pred: &[u32], labels: &[u32], classes: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; classes]; classes];
    for (&p, &l) in pred.iter().zip(labels) {
        if (p as usize) < classes && (l as usize) < classes {
            m[l as usize][p as usize] += 1;
        }
    }
    m
}

/// Precision, recall, F1 and support of one class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

/// Per-class scores from a confusion matrix (0 where undefined, as scikit-learn's zero_division=0).
pub fn per_class_scores(confusion: &[Vec<u64>]) -> Vec<ClassScores> {
    let k = confusion.len();
    (0..k)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let predicted: u64 = (0..k).map(|r| confusion[r][c]).sum();
            let support: u64 = confusion[c].iter().sum();
            let precision = if predicted > 0 { tp / predicted as f64 } else { 0.0 };
            let recall = if support > 0 { tp / support as f64 } else { 0.0 };
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            ClassScores { precision, recall, f1, support }
        })
        .collect()
}

/// Unweighted mean of the per-class scores.
pub fn macro_average(scores: &[ClassScores]) -> ClassScores {
    let n = scores.len().max(1) as f64;
    ClassScores {
        precision: scores.iter().map(|s| s.precision).sum::<f64>() / n,
        recall: scores.iter().map(|s| s.recall).sum::<f64>() / n,
        f1: scores.iter().map(|s| s.f1).sum::<f64>() / n,
        support: scores.iter().map(|s| s.support).sum(),
    }
}

pub fn mse(pred: &[f32], target: &[f32]) -> f64 {
    pred.iter().zip(target).map(|(&p, &t)| (p as f64 - t as f64).powi(2)).sum::<f64>() / target.len().max(1) as f64
}

/// Coefficient of determination: 1 - SS_res / SS_tot.
pub fn r2(pred: &[f32], target: &[f32]) -> f64 {
    let mean = target.iter().map(|&t| t as f64).sum::<f64>() / target.len().max(1) as f64;
    let ss_tot: f64 = target.iter().map(|&t| (t as f64 - mean).powi(2)).sum();
    let ss_res: f64 = pred.iter().zip(target).map(|(&p, &t)| (p as f64 - t as f64).powi(2)).sum();
    if ss_tot == 0.0 {
        return 0.0;
    }
    1.0 - ss_res / ss_tot
}

/// Index of the largest value of each row of a [rows, cols] matrix.
pub fn argmax_rows(values: &[f32], cols: usize) -> Vec<u32> {
    values.chunks(cols.max(1)).map(|row| row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_match_hand_computed_example() {
        // true: 0 0 1 1 2, predicted: 0 1 1 1 0
        let (pred, labels) = ([0, 1, 1, 1, 0], [0, 0, 1, 1, 2]);
        let cm = confusion_matrix(&pred, &labels, 3);
        assert_eq!(cm, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]);
        let s = per_class_scores(&cm);
        assert!((s[0].precision - 0.5).abs() < 1e-12 && (s[0].recall - 0.5).abs() < 1e-12);
        assert!((s[1].precision - 2.0 / 3.0).abs() < 1e-12 && (s[1].recall - 1.0).abs() < 1e-12 && (s[1].f1 - 0.8).abs() < 1e-12);
        assert_eq!(s[2].f1, 0.0);
        assert!((accuracy(&pred, &labels) - 0.6).abs() < 1e-12);
        assert!((macro_average(&s).recall - 0.5).abs() < 1e-12);
    }

    #[test]
    fn regression_metrics() {
        let t = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(r2(&t, &t), 1.0);
        assert!((mse(&[1.0, 2.0, 3.0, 5.0], &t) - 0.25).abs() < 1e-12);
        assert!(r2(&[2.5; 4], &t).abs() < 1e-12);
        assert_eq!(argmax_rows(&[0.1, 0.9, 0.0, 3.0, 1.0, 2.0], 3), vec![1, 0]);
    }
}
