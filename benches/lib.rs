//! Kiln's benchmarks, in their own crate beside the engine: the kernel benchmark suite behind `kiln bench`
//! and `cargo bench -p kiln-benches` (suite.rs: timing, measured roofs, every kernel validated against a
//! multi-threaded CPU reference before it is timed) and the training-step benchmark (step.rs). They dispatch
//! kernels through `kiln_graph::backend` directly; the models and the training loop do not.

pub mod step;
pub mod suite;
