//! kiln-data: the real data sets the examples train on, splits, feature scaling, polynomial features and
//! mini-batch iteration. Everything is plain host data (`Vec<f32>`), uploaded by the training loop.

mod dataset;
mod error;
mod idx;
mod loaders;
mod prep;

pub use dataset::{Dataset, Targets};
pub use error::{DataError, Result};
pub use idx::{parse_idx, read_idx, IdxArray};
pub use loaders::{load, load_breast_cancer, load_diabetes, load_digits, load_fashion_mnist, load_iris, load_mnist10k, load_split, load_wine, parse_sklearn_csv, DATASETS, FASHION_MNIST_SYSTEM_DIR};
pub use prep::{polynomial_features, Batches, MeanNormalizer, Split, Standardizer};
