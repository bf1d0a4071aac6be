//! Kiln: a deep-learning training engine that runs on any GPU through wgpu (Vulkan, Metal, DX12), and on a
//! machine without one through Mesa's lavapipe. This crate re-exports the parts; `use kiln::prelude::*`
//! brings in what a training script needs.
//!
//! ```text
//! kiln::backend  devices: Device (open several; each its own pool, caches, settings), buffers, readback
//! kiln::graph    Tensor, ops with forward and backward rules, autograd (Grads, create_graph), losses, custom
//!                ops (CustomOp) and the public gradcheck, the CPU reference
//! kiln::nn       Module and Layer, layers, LstmCell, VarStore (named parameters), Optimizer (groups, clipping, accumulation),
//!                schedules, metrics, checkpoints (safetensors, PyTorch names)
//! kiln::data     the Dataset trait, collators and the DataLoader; the bundled real data sets, splits, scaling
//! kiln::models   the zoo (LeNet-5 .. ResNet, VGG-16, GoogLeNet) and the training loop behind `kiln train`
//! ```
//!
//! A model of your own, trained on your own tensors (see `examples/custom_model` for the whole script):
//!
//! ```
//! use kiln::prelude::*;
//!
//! # fn main() -> kiln::graph::Result<()> {
//! let mut vs = VarStore::new(0);
//! let net = Sequential::new()
//!     .push(Linear::new(&mut vs, "fc1", 2, 16, Init::HeNormal)?)
//!     .push(Activation::Tanh)
//!     .push(Linear::new(&mut vs, "fc2", 16, 1, Init::XavierUniform)?);
//! vs.finish()?;
//! // XOR: four points, one target each.
//! let x = Tensor::from_slice(&[0., 0., 0., 1., 1., 0., 1., 1.], &[4, 2])?;
//! let y = Tensor::from_slice(&[0., 1., 1., 0.], &[4, 1])?;
//! let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 0.05, 0.0, Schedule::constant(), 300)?;
//! let mut last = f32::MAX;
//! for _ in 0..300 {
//!     let l = loss::bce_with_logits(&net.forward(&x)?, &y)?;
//!     let grads = l.backward()?;
//!     opt.step(&vs, &grads)?;
//!     last = l.to_scalar()?;
//! }
//! assert!(last < 0.1, "XOR loss {last}");
//! # Ok(())
//! # }
//! ```

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

pub use kiln_data as data;
pub use kiln_graph as graph;
pub use kiln_models as models;
pub use kiln_nn as nn;
pub use kiln_wgpu as backend;

/// What a training script needs: tensors and devices, layers and modules, parameters, optimizers, schedules,
/// losses, checkpoints and metrics.
pub mod prelude {
    pub use kiln_data::{ArrayDataset, Collate, DataLoader, Dataset, HostBatch, LoaderOptions, StackRows};
    pub use kiln_graph::{loss, no_grad, Conv2dGeom, CustomOp, DType, Grads, KilnError, Pool2dGeom, Rng, Tensor};
    pub use kiln_nn::checkpoint;
    pub use kiln_nn::metrics;
    pub use kiln_nn::schedule::Schedule;
    pub use kiln_nn::{
        Activation, AdaptiveAvgPool2d, AvgPool2d, BatchNorm, Clip, Conv2d, Conv2dConfig, Dropout, Flatten, GlobalAvgPool, GroupOptions, Init, Layer, Linear, LrSchedule, LstmCell, LstmState,
        MaxPool2d, Module, Optimizer, OptimizerKind, Padding, Param, Sequential, VarStore,
    };
    pub use kiln_wgpu::{Device, DeviceOptions};
}
