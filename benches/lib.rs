//! Kiln's benchmarks, in their own crate beside the engine: the kernel benchmark suite behind `kiln bench`
//! and `cargo bench -p kiln-benches` (suite.rs: timing, measured roofs, every kernel validated against a
//! multi-threaded CPU reference before it is timed) and the training-step benchmark (step.rs). They dispatch
//! kernels through `kiln_graph::backend` directly; the models and the training loop do not.

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod step;
pub mod suite;
