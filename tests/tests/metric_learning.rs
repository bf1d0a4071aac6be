//! Metric learning: PyTorch's pairwise distance and triplet margin loss (values and gradients from torch),
//! the contrastive loss, the three in-batch minings against plain f64 loops and finite differences, the
//! verification scores against scikit-learn, and the errors of a batch without triplets.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::loss::{contrastive_loss, distance_matrix, pairwise_distance, triplet_margin_loss};
use kiln_graph::Tensor;
use kiln_nn::metric_learning::{batch_triplet_loss, best_threshold, roc_auc, Mining};
use kiln_tests::{assert_close, check_op, require_gpu, test_rng, Domain};

fn grid(f: impl Fn(usize, usize) -> f64) -> Vec<f32> {
    (0..5).flat_map(|i| (0..4).map(move |j| (i, j))).map(|(i, j)| f(i, j) as f32).collect()
}

/// (swap, margin, loss, anchor gradient, negative gradient) as torch computed them.
type TorchCase = (bool, f32, f64, [f64; 20], [f64; 20]);

#[test]
fn triplet_margin_loss_equals_torch() {
    require_gpu();
    // torch 2.15, f64: a = sin(0.7 i + j), p = cos(1.3 i - 0.5 j), n = 0.5 sin(2.1 i + 0.9 j) + 0.2, [5, 4].
    let a = grid(|i, j| (i as f64 * 0.7 + j as f64).sin());
    let p = grid(|i, j| (i as f64 * 1.3 - j as f64 * 0.5).cos());
    let n = grid(|i, j| 0.5 * (i as f64 * 2.1 + j as f64 * 0.9).sin() + 0.2);
    let t = |v: &[f32]| Tensor::from_slice(v, &[5, 4]).unwrap().var();
    let (at, pt, nt) = (t(&a), t(&p), t(&n));
    let d = pairwise_distance(&at, &pt, 1e-6).unwrap();
    assert_close("pairwise_distance", &d.to_vec().unwrap(), &[1.068837682373798, 1.6695685216372569, 2.6102023593818915, 1.8976349105747834, 0.8832897343278687], 1e-5);
    #[rustfmt::skip]
    let cases: [TorchCase; 2] = [
        (false, 0.3, 0.5410390802100287,
         [-0.103006325, -0.1118177795, -0.0244768038, 0.1278031924, 0.0424688471, -0.116671604, -0.1836638884, -0.1320210498, 0.0266301917, 0.0024327101, 0.0122776897, 0.0274583134, 0.1075278518, 0.1571206849, 0.1537382391, 0.1020980712, 0.0, 0.0, 0.0, 0.0],
         [-0.0841126391, 0.105060799, 0.0935230448, -0.1146330343, 0.0026589633, 0.1520051764, 0.1204193313, -0.0488522357, 0.1145343028, 0.0880055106, -0.0296204508, -0.1351279115, 0.0599588088, -0.0508431444, -0.137646413, -0.1219564713, 0.0, 0.0, 0.0, 0.0]),
        (true, 1.0, 1.6253053945559106,
         [-0.103006325, -0.1118177795, -0.0244768038, 0.1278031924, 0.0424688471, -0.116671604, -0.1836638884, -0.1320210498, 0.1411644945, 0.0904382207, -0.0173427611, -0.1076695981, 0.1075278518, 0.1571206849, 0.1537382391, 0.1020980712, -0.0302341386, -0.1357353548, -0.1145496812, 0.0868342147],
         [-0.0841126391, 0.105060799, 0.0935230448, -0.1146330343, 0.0026589633, 0.1520051764, 0.1204193313, -0.0488522357, -0.1844446899, -0.0718469575, -0.026575594, -0.0105786998, 0.0599588088, -0.0508431444, -0.137646413, -0.1219564713, -0.0440444935, -0.0761754457, -0.0944020836, -0.1527927703]),
    ];
    for (swap, margin, value, ga, gn) in cases {
        let l = triplet_margin_loss(&at, &pt, &nt, margin, swap).unwrap();
        assert_close(&format!("triplet_margin_loss swap={swap} margin={margin}"), &l.to_vec().unwrap(), &[value], 1e-5);
        let g = l.backward().unwrap();
        assert_close("its anchor gradient", &g.get(&at).unwrap().to_vec().unwrap(), &ga, 1e-4);
        assert_close("its negative gradient", &g.get(&nt).unwrap().to_vec().unwrap(), &gn, 1e-4);
    }
    let e = triplet_margin_loss(&at, &pt, &Tensor::zeros(&[5, 3]).unwrap(), 1.0, false).unwrap_err().to_string();
    assert!(e.contains("[5, 4]") && e.contains("[5, 3]"), "{e}");
}

/// f64 Euclidean distances between rows of a [n, d] reference tensor.
fn distances(x: &CpuTensor) -> Vec<f64> {
    let (n, d) = (x.shape[0], x.shape[1]);
    (0..n * n).map(|k| (0..d).map(|j| (x.data[(k / n) * d + j] - x.data[(k % n) * d + j]).powi(2)).sum::<f64>().sqrt()).collect()
}

/// The three minings written as plain loops over (anchor, positive, negative).
fn mined_reference(x: &CpuTensor, labels: &[u32], margin: f64, mining: Mining) -> f64 {
    let n = labels.len();
    let d = distances(x);
    let pos = |a: usize, p: usize| a != p && labels[a] == labels[p];
    let neg = |a: usize, q: usize| labels[a] != labels[q];
    match mining {
        Mining::Hard => {
            let (mut sum, mut count) = (0.0, 0.0);
            for a in 0..n {
                let hp = (0..n).filter(|&p| pos(a, p)).map(|p| d[a * n + p]).fold(f64::NAN, f64::max);
                let hn = (0..n).filter(|&q| neg(a, q)).map(|q| d[a * n + q]).fold(f64::NAN, f64::min);
                if hp.is_finite() && hn.is_finite() {
                    sum += (hp - hn + margin).max(0.0);
                    count += 1.0;
                }
            }
            sum / count
        }
        Mining::All => {
            let (mut sum, mut active) = (0.0, 0.0);
            for a in 0..n {
                for p in (0..n).filter(|&p| pos(a, p)) {
                    for q in (0..n).filter(|&q| neg(a, q)) {
                        let l = (d[a * n + p] - d[a * n + q] + margin).max(0.0);
                        sum += l;
                        active += (l > 1e-16) as u8 as f64;
                    }
                }
            }
            sum / active.max(1.0)
        }
        Mining::SemiHard => {
            let (mut sum, mut count) = (0.0, 0.0);
            for a in 0..n {
                for p in (0..n).filter(|&p| pos(a, p)) {
                    let farther = (0..n).filter(|&q| neg(a, q) && d[a * n + q] > d[a * n + p]).map(|q| d[a * n + q]).fold(f64::INFINITY, f64::min);
                    let chosen = if farther.is_finite() { farther } else { (0..n).filter(|&q| neg(a, q)).map(|q| d[a * n + q]).fold(f64::NEG_INFINITY, f64::max) };
                    sum += (d[a * n + p] - chosen + margin).max(0.0);
                    count += 1.0;
                }
            }
            sum / count
        }
    }
}

#[test]
fn batch_mining_matches_plain_loops_and_finite_differences() {
    // 14 embeddings of 5 dimensions in 4 classes (one of a single sample: an anchor with no positive).
    let labels = [0u32, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 1];
    for mining in [Mining::Hard, Mining::All, Mining::SemiHard] {
        for margin in [0.2f32, 1.5] {
            check_op(
                &format!("batch triplet loss {mining:?} margin {margin}"),
                &[(&[14, 5], Domain::Any)],
                |x| batch_triplet_loss(&x[0], &labels, margin, mining),
                |x| CpuTensor::new(vec![mined_reference(&x[0], &labels, margin as f64, mining)], &[]),
            );
        }
    }
}

#[test]
fn contrastive_loss_and_the_distance_matrix_match_their_formulas() {
    let same = [1.0f32, 0.0, 0.0, 1.0, 0.0, 1.0];
    check_op(
        "contrastive loss",
        &[(&[6, 3], Domain::Any), (&[6, 3], Domain::Any)],
        |x| contrastive_loss(&x[0], &x[1], &Tensor::from_slice(&same, &[6]).unwrap(), 1.5),
        |x| {
            let loss: f64 = (0..6)
                .map(|i| {
                    let d = (0..3).map(|j| (x[0].data[i * 3 + j] - x[1].data[i * 3 + j] + 1e-6).powi(2)).sum::<f64>().sqrt();
                    0.5 * if same[i] == 1.0 { d * d } else { (1.5 - d).max(0.0).powi(2) }
                })
                .sum();
            CpuTensor::new(vec![loss / 6.0], &[])
        },
    );
    // Off the diagonal (whose clamped roots are 1e-6 with no gradient), the distance matrix is the distances.
    check_op(
        "distance matrix off the diagonal",
        &[(&[7, 4], Domain::Any)],
        |x| {
            let off: Vec<f32> = (0..49).map(|k| (k / 7 != k % 7) as u8 as f32).collect();
            distance_matrix(&x[0])?.mul(&Tensor::from_slice(&off, &[7, 7])?)
        },
        |x| CpuTensor::new(distances(&x[0]).iter().enumerate().map(|(k, &v)| if k / 7 != k % 7 { v } else { 0.0 }).collect(), &[7, 7]),
    );
}

#[test]
fn a_batch_without_triplets_is_an_error_naming_what_it_held() {
    require_gpu();
    let e = Tensor::zeros(&[4, 3]).unwrap();
    let one_class = batch_triplet_loss(&e, &[2, 2, 2, 2], 0.5, Mining::Hard).unwrap_err().to_string();
    assert!(one_class.contains("at least two classes") && one_class.contains("1 class"), "{one_class}");
    let no_pair = batch_triplet_loss(&e, &[0, 1, 2, 3], 0.5, Mining::SemiHard).unwrap_err().to_string();
    assert!(no_pair.contains("none twice"), "{no_pair}");
    let wrong = batch_triplet_loss(&e, &[0, 1, 1], 0.5, Mining::All).unwrap_err().to_string();
    assert!(wrong.contains("[4, 3]") && wrong.contains("3 labels"), "{wrong}");
}

#[test]
fn verification_scores_equal_scikit_learn() {
    // sklearn.metrics.roc_auc_score on these (ties across classes included): 0.7222222222222222.
    let y = [true, false, true, true, false, false, true, false, true, false, false, true];
    let s = [0.9, 0.1, 0.4, 0.4, 0.4, 0.2, 0.75, 0.75, 0.3, 0.05, 0.6, 0.6];
    assert!((roc_auc(&s, &y).unwrap() - 0.7222222222222222).abs() < 1e-12);
    assert_eq!(roc_auc(&s, &[true; 12]), None);
    // Random scores against the ROC curve's trapezoids (scikit-learn's own route).
    let mut rng = test_rng("roc auc");
    for _ in 0..20 {
        let n = 2 + rng.below(200);
        let s: Vec<f64> = (0..n).map(|_| (rng.below(20) as f64) / 4.0).collect();
        let y: Vec<bool> = (0..n).map(|i| i == 0 || (i > 1 && rng.uniform() < 0.4)).collect();
        let (p, q) = (y.iter().filter(|&&v| v).count() as f64, y.iter().filter(|&&v| !v).count() as f64);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        let (mut tp, mut fp, mut area, mut i) = (0.0, 0.0, 0.0, 0);
        while i < n {
            let (tp0, fp0) = (tp, fp);
            let t = s[order[i]];
            while i < n && s[order[i]] == t {
                if y[order[i]] {
                    tp += 1.0;
                } else {
                    fp += 1.0;
                }
                i += 1;
            }
            area += (fp - fp0) / q * (tp + tp0) / (2.0 * p);
        }
        assert!((roc_auc(&s, &y).unwrap() - area).abs() < 1e-12);
        // The best threshold's accuracy is the best over every cut.
        let (t, acc) = best_threshold(&s, &y);
        let acc_at = |t: f64| s.iter().zip(&y).filter(|(v, l)| (**v >= t) == **l).count() as f64 / n as f64;
        assert!((acc_at(t) - acc).abs() < 1e-12);
        assert!(s.iter().all(|&c| acc_at(c) <= acc + 1e-12));
    }
}
