/// What a data set predicts.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Class indices in 0..classes.len(), with the class names.
    Classes { labels: Vec<u32>, names: Vec<String> },
    /// One real value per sample.
    Values(Vec<f32>),
}

/// Samples as rows of `features` numbers (row-major in `x`), with their targets.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayDataset {
    pub name: String,
    pub x: Vec<f32>,
    pub features: usize,
    pub targets: Targets,
    /// For image data: each row is a [channels, height, width] image, row-major.
    pub image: Option<[usize; 3]>,
}

impl ArrayDataset {
    pub fn len(&self) -> usize {
        self.x.len() / self.features.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn num_classes(&self) -> Option<usize> {
        match &self.targets {
            Targets::Classes { names, .. } => Some(names.len()),
            Targets::Values(_) => None,
        }
    }
    pub fn labels(&self) -> Option<&[u32]> {
        match &self.targets {
            Targets::Classes { labels, .. } => Some(labels),
            Targets::Values(_) => None,
        }
    }
    pub fn values(&self) -> Option<&[f32]> {
        match &self.targets {
            Targets::Values(v) => Some(v),
            Targets::Classes { .. } => None,
        }
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.features..(i + 1) * self.features]
    }

    /// The samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> ArrayDataset {
        let mut x = Vec::with_capacity(indices.len() * self.features);
        for &i in indices {
            x.extend_from_slice(self.row(i));
        }
        let targets = match &self.targets {
            Targets::Classes { labels, names } => Targets::Classes { labels: indices.iter().map(|&i| labels[i]).collect(), names: names.clone() },
            Targets::Values(v) => Targets::Values(indices.iter().map(|&i| v[i]).collect()),
        };
        ArrayDataset { name: self.name.clone(), x, features: self.features, targets, image: self.image }
    }

    /// Only the given feature columns.
    pub fn select_features(&self, columns: &[usize]) -> ArrayDataset {
        let mut x = Vec::with_capacity(self.len() * columns.len());
        for i in 0..self.len() {
            let r = self.row(i);
            x.extend(columns.iter().map(|&c| r[c]));
        }
        ArrayDataset { name: self.name.clone(), x, features: columns.len(), targets: self.targets.clone(), image: None }
    }

    /// Same samples, new features (for feature maps such as polynomial expansion).
    pub fn with_features(&self, x: Vec<f32>, features: usize) -> ArrayDataset {
        let image = self.image.filter(|_| features == self.features);
        ArrayDataset { name: self.name.clone(), x, features, targets: self.targets.clone(), image }
    }
}
