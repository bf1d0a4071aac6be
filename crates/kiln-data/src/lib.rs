//! kiln-data: the real data sets the examples train on, splits, feature scaling, polynomial features and
//! mini-batch iteration. Everything is plain host data (`Vec<f32>`), uploaded by the training loop.

mod dataset;
mod error;
mod loaders;
mod prep;

pub use dataset::{Dataset, Targets};
pub use error::{DataError, Result};
pub use loaders::{load, load_breast_cancer, load_diabetes, load_digits, load_iris, load_wine, parse_sklearn_csv, DATASETS};
pub use prep::{polynomial_features, Batches, MeanNormalizer, Split, Standardizer};
