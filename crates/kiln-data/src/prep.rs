//! Splits, feature scaling, polynomial features and mini-batches.

use crate::dataset::ArrayDataset;
use crate::error::{DataError, Result};

/// A seeded train / dev / test split.
#[derive(Clone, Debug)]
pub struct Split {
    pub train: ArrayDataset,
    pub dev: ArrayDataset,
    pub test: ArrayDataset,
}

/// splitmix64: the data crate's own tiny generator, so a split depends only on the seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn shuffle(items: &mut [usize], state: &mut u64) {
    for i in (1..items.len()).rev() {
        let j = (splitmix(state) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

impl Split {
    /// Shuffles with `seed` and cuts `dev` and `test` fractions off (the rest is train).
    pub fn new(ds: &ArrayDataset, dev: f64, test: f64, seed: u64) -> Result<Split> {
        if !(0.0..1.0).contains(&dev) || !(0.0..1.0).contains(&test) || dev + test >= 1.0 || ds.is_empty() {
            return Err(DataError::Invalid(format!("split fractions dev={dev} test={test} must be in [0,1) and sum below 1")));
        }
        let n = ds.len();
        let mut idx: Vec<usize> = (0..n).collect();
        let mut state = seed ^ 0x005E_ED0F_D47A;
        shuffle(&mut idx, &mut state);
        let n_test = (n as f64 * test).round() as usize;
        let n_dev = (n as f64 * dev).round() as usize;
        if n_test + n_dev >= n {
            return Err(DataError::Invalid(format!("{} has {n} samples: too few for the split", ds.name)));
        }
        let test_set = ds.subset(&idx[..n_test]);
        let dev_set = ds.subset(&idx[n_test..n_test + n_dev]);
        let train = ds.subset(&idx[n_test + n_dev..]);
        Ok(Split { train, dev: dev_set, test: test_set })
    }

    /// Keeps a given test set and carves a seeded `dev` fraction out of `train`.
    pub fn with_test(train: &ArrayDataset, test: ArrayDataset, dev: f64, seed: u64) -> Result<Split> {
        let s = Split::new(train, 0.0, dev, seed)?;
        Ok(Split { train: s.train, dev: s.test, test })
    }

    /// Applies a feature map (fitted on train only, by the caller) to all three parts.
    pub fn map(&self, f: impl Fn(&ArrayDataset) -> ArrayDataset) -> Split {
        Split { train: f(&self.train), dev: f(&self.dev), test: f(&self.test) }
    }
}

fn column_stats(ds: &ArrayDataset) -> Vec<(f64, f64, f64, f64)> {
    // (mean, std, min, max) per feature, f64 accumulation.
    let n = ds.len().max(1) as f64;
    (0..ds.features)
        .map(|c| {
            let col = (0..ds.len()).map(|i| ds.x[i * ds.features + c] as f64);
            let (mut s, mut s2, mut lo, mut hi) = (0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY);
            for v in col {
                s += v;
                s2 += v * v;
                lo = lo.min(v);
                hi = hi.max(v);
            }
            let mean = s / n;
            let var = (s2 / n - mean * mean).max(0.0);
            (mean, var.sqrt(), lo, hi)
        })
        .collect()
}

fn apply_affine(ds: &ArrayDataset, shift: &[f64], scale: &[f64]) -> ArrayDataset {
    let mut x = ds.x.clone();
    for (i, v) in x.iter_mut().enumerate() {
        let c = i % ds.features;
        *v = ((*v as f64 - shift[c]) * scale[c]) as f32;
    }
    ds.with_features(x, ds.features)
}

/// Standardisation: (x - mean) / std per feature, statistics from the data it was fitted on (the train split).
#[derive(Clone, Debug)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Standardizer {
    pub fn fit(train: &ArrayDataset) -> Standardizer {
        let stats = column_stats(train);
        Standardizer { mean: stats.iter().map(|s| s.0).collect(), std: stats.iter().map(|s| s.1).collect() }
    }
    /// Constant features (std 0) are centred, not scaled.
    pub fn apply(&self, ds: &ArrayDataset) -> ArrayDataset {
        let inv: Vec<f64> = self.std.iter().map(|&s| if s > 1e-12 { 1.0 / s } else { 1.0 }).collect();
        apply_affine(ds, &self.mean, &inv)
    }
}

/// Mean normalisation: (x - mean) / (max - min) per feature, statistics from the train split.
#[derive(Clone, Debug)]
pub struct MeanNormalizer {
    pub mean: Vec<f64>,
    pub range: Vec<f64>,
}

impl MeanNormalizer {
    pub fn fit(train: &ArrayDataset) -> MeanNormalizer {
        let stats = column_stats(train);
        MeanNormalizer { mean: stats.iter().map(|s| s.0).collect(), range: stats.iter().map(|s| s.3 - s.2).collect() }
    }
    pub fn apply(&self, ds: &ArrayDataset) -> ArrayDataset {
        let inv: Vec<f64> = self.range.iter().map(|&r| if r > 1e-12 { 1.0 / r } else { 1.0 }).collect();
        apply_affine(ds, &self.mean, &inv)
    }
}

/// Every monomial of the features up to `degree` (no constant term), as scikit-learn's PolynomialFeatures:
/// for one feature x, [x, x^2, ..., x^degree].
pub fn polynomial_features(ds: &ArrayDataset, degree: usize) -> ArrayDataset {
    // Exponent combinations with replacement, grouped by total degree.
    let d = ds.features;
    let mut terms: Vec<Vec<usize>> = Vec::new();
    let mut frontier: Vec<Vec<usize>> = (0..d).map(|c| vec![c]).collect();
    for _ in 0..degree {
        terms.extend(frontier.iter().cloned());
        frontier = frontier.iter().flat_map(|t| (*t.last().unwrap_or(&0)..d).map(move |c| [t.clone(), vec![c]].concat())).collect();
    }
    let mut x = Vec::with_capacity(ds.len() * terms.len());
    for i in 0..ds.len() {
        let row = ds.row(i);
        x.extend(terms.iter().map(|t| t.iter().map(|&c| row[c] as f64).product::<f64>() as f32));
    }
    ds.with_features(x, terms.len())
}

/// Mini-batch index iterator: a seeded shuffle per epoch, the last batch may be short.
pub struct Batches {
    order: Vec<usize>,
    batch: usize,
    at: usize,
}

impl Batches {
    pub fn new(n: usize, batch: usize, shuffle_seed: Option<u64>) -> Result<Batches> {
        if batch == 0 {
            return Err(DataError::Invalid("batch size must be at least 1".into()));
        }
        let mut order: Vec<usize> = (0..n).collect();
        if let Some(seed) = shuffle_seed {
            let mut state = seed;
            shuffle(&mut order, &mut state);
        }
        Ok(Batches { order, batch, at: 0 })
    }
}

impl Iterator for Batches {
    type Item = Vec<usize>;
    fn next(&mut self) -> Option<Vec<usize>> {
        if self.at >= self.order.len() {
            return None;
        }
        let end = (self.at + self.batch).min(self.order.len());
        let b = self.order[self.at..end].to_vec();
        self.at = end;
        Some(b)
    }
}
