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
//! tune.rs      the autotuner: which matmul kernel runs per adapter and shape class, cached on disk
//! ```

pub mod augment;
pub mod backprop;
mod conv;
pub mod cpu;
pub mod error;
pub mod kernels;
pub mod loss;
mod ops;
pub mod rng;
pub mod shape;
pub mod tune;
mod tensor;

pub use augment::Augment;
pub use backprop::{Grads, Op};
pub use conv::{conv2d_grads, pool2d_grad, Conv2dGeom, Pool2dGeom};
pub use error::{KilnError, Result};
pub use rng::Rng;
pub use tensor::{grad_enabled, no_grad, DType, NoGradGuard, Tensor, TensorId};
pub use kiln_wgpu as backend;

static FUSION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Whether fused kernels run where they apply: a layer's bias with the activation after it, batch norm, the
/// cross-entropy loss (default on; `KILN_FUSE=off` or `set_fusion(false)` runs the composite formulas, for
/// measuring what fusion pays and for tests that compare the two).
pub fn fusion_enabled() -> bool {
    use std::sync::atomic::Ordering;
    match FUSION.load(Ordering::Relaxed) {
        0 => false,
        1 => true,
        _ => {
            let on = std::env::var("KILN_FUSE").map(|v| v != "off" && v != "0").unwrap_or(true);
            FUSION.store(on as u8, Ordering::Relaxed);
            on
        }
    }
}

pub fn set_fusion(on: bool) {
    FUSION.store(on as u8, std::sync::atomic::Ordering::Relaxed);
}
