//! A Frechet distance for generated images on the features of a classifier Kiln trains itself on the same
//! data set. It is computed as FID is (Heusel et al. 2017), but it is NOT the Inception FID: the features
//! come from [`FeatureNet`]'s 128-unit hidden layer, so its values compare runs of Kiln with each other, not
//! with published FIDs.
//!
//! d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with tr (S_a S_b)^(1/2) computed as the sum of
//! the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so Jacobi's method in f64).

use kiln_graph::{KilnError, Pool2dGeom, Result, Rng, Tensor};
use kiln_nn::{Conv2d, Conv2dConfig, Init, Layer, Linear, Module, Padding, Param, VarStore};

/// Width of the feature layer.
pub const FEATURES: usize = 128;

/// A small classifier for 28 x 28 grey images: 3x3 convolutions 1 -> 32 -> 64 (ReLU, 2x2 max pooling after
/// each), a 128-unit ReLU layer (the features), a linear layer to 10 classes. Inputs in [0, 1].
pub struct FeatureNet {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub hidden: Linear,
    pub out: Linear,
}

impl FeatureNet {
    pub fn new(vs: &mut VarStore) -> Result<FeatureNet> {
        let same = Conv2dConfig { padding: Padding::Same, ..Default::default() };
        Ok(FeatureNet {
            conv1: Conv2d::new(vs, "features.0", 1, 32, 3, same)?,
            conv2: Conv2d::new(vs, "features.1", 32, 64, 3, same)?,
            hidden: Linear::new(vs, "hidden", 64 * 49, FEATURES, Init::HeNormal)?,
            out: Linear::new(vs, "classifier", FEATURES, 10, Init::XavierUniform)?,
        })
    }

    /// images [n, 1, 28, 28] -> (features [n, 128], logits [n, 10]).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.shape()[0];
        let h = self.conv1.forward(x)?.relu()?.max_pool2d(Pool2dGeom::square(2))?.0;
        let h = self.conv2.forward(&h)?.relu()?.max_pool2d(Pool2dGeom::square(2))?.0;
        let f = self.hidden.forward(&h.reshape(&[n, 64 * 49])?)?.relu()?;
        let logits = self.out.forward(&f)?;
        Ok((f, logits))
    }

    /// Features [n, 128] and predicted classes of images [n, 784] in [0, 1], without the tape.
    pub fn describe_images(&self, images: &[f32]) -> Result<(Vec<f32>, Vec<u32>)> {
        let n = images.len() / 784;
        let (mut feats, mut classes) = (Vec::with_capacity(n * FEATURES), Vec::with_capacity(n));
        for from in (0..n).step_by(500) {
            let m = 500.min(n - from);
            let (f, l) = kiln_graph::no_grad(|| self.forward(&Tensor::from_slice(&images[from * 784..(from + m) * 784], &[m, 1, 28, 28])?))?;
            feats.extend(f.to_vec()?);
            classes.extend(kiln_nn::metrics::argmax_rows(&l.to_vec()?, 10));
        }
        Ok((feats, classes))
    }
}

impl Module for FeatureNet {
    fn describe(&self) -> String {
        "FeatureNet".into()
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("features.0".into(), &self.conv1 as &dyn Module), ("features.1".into(), &self.conv2), ("hidden".into(), &self.hidden), ("classifier".into(), &self.out)]
    }
}

/// Trains a [`FeatureNet`] on images [n, 784] in [0, 1] with labels (Adam 1e-3, batch 64, `steps` steps) and
/// returns it with its accuracy on the test images.
pub fn train_feature_net(train: (&[f32], &[u32]), test: (&[f32], &[u32]), steps: u64, seed: u64) -> Result<(FeatureNet, f64)> {
    let mut vs = VarStore::new(seed);
    let net = FeatureNet::new(&mut vs)?;
    vs.finish()?;
    let mut opt = crate::trainer::adam_cosine(&vs, 1e-3, steps, None)?;
    let mut rng = Rng::new(seed ^ 0xfea7);
    let n = train.1.len();
    for _ in 0..steps {
        let idx: Vec<usize> = (0..64).map(|_| rng.below(n)).collect();
        let px: Vec<f32> = idx.iter().flat_map(|&i| train.0[i * 784..(i + 1) * 784].iter().copied()).collect();
        let y: Vec<u32> = idx.iter().map(|&i| train.1[i]).collect();
        let (_, logits) = net.forward(&Tensor::from_slice(&px, &[64, 1, 28, 28])?)?;
        let l = kiln_graph::loss::cross_entropy(&logits, &Tensor::from_u32(&y, &[64])?)?;
        opt.step(&vs, &l.backward()?)?;
        // Reading the loss ends the step's recording; a loop that never reads keeps every step's buffers alive.
        l.to_scalar()?;
    }
    let (_, predicted) = net.describe_images(test.0)?;
    Ok((net, kiln_nn::metrics::accuracy(&predicted, test.1)))
}

/// Mean [d] and covariance [d, d] (divided by n - 1) of rows [n, d], in f64.
pub fn mean_and_covariance(rows: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len() / d.max(1);
    let mean: Vec<f64> = (0..d).map(|j| (0..n).map(|i| rows[i * d + j] as f64).sum::<f64>() / n.max(1) as f64).collect();
    let mut cov = vec![0.0; d * d];
    for i in 0..n {
        let c: Vec<f64> = (0..d).map(|j| rows[i * d + j] as f64 - mean[j]).collect();
        for a in 0..d {
            if c[a] == 0.0 {
                continue;
            }
            for b in a..d {
                cov[a * d + b] += c[a] * c[b];
            }
        }
    }
    let div = (n.max(2) - 1) as f64;
    for a in 0..d {
        for b in a..d {
            cov[a * d + b] /= div;
            cov[b * d + a] = cov[a * d + b];
        }
    }
    (mean, cov)
}

/// Eigenvalues and eigenvectors (columns of the returned [d, d]) of a symmetric matrix, by cyclic Jacobi
/// rotations until the off-diagonal mass is negligible.
pub fn symmetric_eigen(m: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let scale = a.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
    for _ in 0..100 {
        let off: f64 = (0..d).flat_map(|p| (0..d).filter(move |&q| q != p).map(move |q| (p, q))).map(|(p, q)| a[p * d + q] * a[p * d + q]).sum::<f64>().sqrt();
        if off <= 1e-14 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// The Frechet distance (its square, as FID reports it) between two sets of feature rows [n, d] and [m, d].
pub fn frechet_distance(a: &[f32], b: &[f32], d: usize) -> Result<f64> {
    if d == 0 || !a.len().is_multiple_of(d) || !b.len().is_multiple_of(d) || a.len() < 2 * d || b.len() < 2 * d {
        return Err(KilnError::Usage(format!("frechet_distance: needs two sets of at least two rows of {d} features (got {} and {} values)", a.len(), b.len())));
    }
    let (ma, sa) = mean_and_covariance(a, d);
    let (mb, sb) = mean_and_covariance(b, d);
    let (ea, va) = symmetric_eigen(&sa, d);
    // S_a^(1/2) = V diag(sqrt(max(e, 0))) V^T.
    let mut root = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            root[i * d + j] = (0..d).map(|k| va[i * d + k] * ea[k].max(0.0).sqrt() * va[j * d + k]).sum();
        }
    }
    let matmul = |x: &[f64], y: &[f64]| -> Vec<f64> { (0..d * d).map(|ij| (0..d).map(|k| x[(ij / d) * d + k] * y[k * d + ij % d]).sum()).collect() };
    let mut inner = matmul(&matmul(&root, &sb), &root);
    // Symmetrise what rounding broke.
    for i in 0..d {
        for j in i + 1..d {
            let avg = 0.5 * (inner[i * d + j] + inner[j * d + i]);
            inner[i * d + j] = avg;
            inner[j * d + i] = avg;
        }
    }
    let (ei, _) = symmetric_eigen(&inner, d);
    let tr_root: f64 = ei.iter().map(|e| e.max(0.0).sqrt()).sum();
    let mean_term: f64 = ma.iter().zip(&mb).map(|(x, y)| (x - y).powi(2)).sum();
    let trace: f64 = (0..d).map(|i| sa[i * d + i] + sb[i * d + i]).sum();
    Ok(mean_term + trace - 2.0 * tr_root)
}

/// How a generator's samples look to the classifier: the Frechet distance of their features to the real
/// ones, and the share of samples given each class.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SampleScores {
    pub frechet: f64,
    pub class_shares: Vec<f64>,
}

impl SampleScores {
    /// How many classes the samples fall in, and the largest class's share (the mode-collapse check).
    pub fn spread(&self) -> (usize, f64) {
        (self.class_shares.iter().filter(|&&v| v > 0.0).count(), self.class_shares.iter().cloned().fold(0.0, f64::max))
    }
}

/// Scores samples [n, 784] in [0, 1] against the real images' features [m, 128].
pub fn score_samples(net: &FeatureNet, samples: &[f32], real_features: &[f32]) -> Result<SampleScores> {
    let (feats, classes) = net.describe_images(samples)?;
    let mut shares = vec![0.0; 10];
    for &c in &classes {
        shares[c as usize] += 1.0 / classes.len().max(1) as f64;
    }
    Ok(SampleScores { frechet: frechet_distance(&feats, real_features, FEATURES)?, class_shares: shares })
}

/// For each sample [784], the index of the nearest image (squared pixel distance) among `images` [n, 784]:
/// the check that samples are not copies of training images.
pub fn nearest_images(samples: &[f32], images: &[f32]) -> Vec<usize> {
    samples
        .chunks(784)
        .map(|s| {
            let d = |i: usize| images[i * 784..(i + 1) * 784].iter().zip(s).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
            (0..images.len() / 784).min_by(|&a, &b| d(a).total_cmp(&d(b))).unwrap_or(0)
        })
        .collect()
}
