//! kiln-graph: GPU tensors, ops with forward and backward rules, the autograd tape, and a CPU reference.
//!
//! ```text
//! tensor.rs    Tensor (GPU storage + shape + dtype + the op that made it), no_grad, detach
//! ops.rs       the ops: validate shapes -> launch kernel -> record op
//! conv.rs      conv2d, max/avg pooling (NCHW) and their gradient kernels' launchers
//! backprop.rs  Op, backward() and every backward rule in one match
//! kernels.rs   one launcher per WGSL entry point in shaders/
//! loss.rs      MSE, BCE-with-logits, softmax cross-entropy
//! cpu.rs       the f64 CPU reference of every op
//! attention.rs scaled dot-product attention as one op (flash-style fused kernels)
//! rnn.rs       a recurrent layer's pass over its steps as one op (fused cell kernels)
//! anomaly.rs   NaN/infinity detection per op (a watch per training step)
//! custom.rs    the open op set: CustomOp (an outside crate's op with its own kernels), launch
//! gradcheck.rs the public gradient check (GPU vs CPU reference, backward vs finite differences)
//! tune.rs      the autotuner: which matmul kernel runs per adapter and shape class, cached on disk
//! ```

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod anomaly;
pub mod attention;
pub mod augment;
pub mod backprop;
mod conv;
pub mod cpu;
pub mod custom;
pub mod error;
pub mod gradcheck;
pub mod kernels;
pub mod loss;
mod ops;
pub mod rng;
pub mod rnn;
pub mod shape;
mod tensor;
pub mod tune;
pub mod vision;

pub use augment::Augment;
pub use backprop::{Grads, OnLeaf, Op};
pub use conv::{conv2d_grads, pool2d_grad, Conv2dGeom, Pool2dGeom};
pub use custom::CustomOp;
pub use error::{KilnError, Result};
pub use kiln_wgpu as backend;
pub use rng::Rng;
pub use tensor::{grad_enabled, no_grad, DType, NoGradGuard, PendingValues, Tensor, TensorId};

/// Whether fused kernels run on `dev` where they apply: a layer's bias with the activation after it, batch
/// norm, the cross-entropy loss (default on; `KILN_FUSE=off` for the process, or `set_fusion` on one device,
/// runs the composite formulas, for measuring what fusion pays and for tests that compare the two).
pub fn fusion_enabled(dev: &backend::Gpu) -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match dev.setting("fusion") {
        Some(v) => v != 0,
        None => *ENV.get_or_init(|| std::env::var("KILN_FUSE").map(|v| v != "off" && v != "0").unwrap_or(true)),
    }
}

/// Turns fusion on or off on one device.
pub fn set_fusion(dev: &backend::Gpu, on: bool) {
    dev.set_setting("fusion", Some(on as u8));
}
