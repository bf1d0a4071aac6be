//! kiln-models: the models of the course, built from kiln-nn, and the training loop every front end uses
//! (`kiln train`, the examples, the tests).

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod autoencoder;
pub mod cnn;
pub mod frechet;
pub mod g2p;
pub mod gan;
pub mod linear_models;
pub mod lm;
pub mod localize;
pub mod names;
pub mod overfeat;
pub mod plot;
pub mod rcnn;
pub mod registry;
pub mod reversal;
pub mod saved;
pub mod scenes;
pub mod segment;
pub mod siamese;
pub mod style;
pub mod train;
pub mod trainer;
pub mod transformer;
pub mod vae;
pub mod yolo;
pub mod zoo;

pub use linear_models::{normal_equation, Task};
pub use registry::{ModelEntry, MODELS, REGISTRY};
pub use train::{evaluate_checkpoint, evaluate_checkpoint_with, run, run_with, EvalReport, TrainConfig, TrainReport};
pub use trainer::{Callback, EarlyStopping, EpochEnd, EpochRecord, EpochTally, FitReport, MetricsCsv, OnProgress, Position, Progress, StepValues, Trainer};
