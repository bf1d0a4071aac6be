//! kiln-models: the models of the course, built from kiln-nn, and the training loop every front end uses
//! (`kiln train`, the examples, the tests).

pub mod cnn;
pub mod linear_models;
pub mod overfeat;
pub mod plot;
pub mod train;
pub mod zoo;

pub use linear_models::{normal_equation, Task, MODELS};
pub use train::{evaluate_checkpoint, run, EvalReport, Progress, TrainConfig, TrainReport};
