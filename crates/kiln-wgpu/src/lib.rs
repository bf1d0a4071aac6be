//! kiln-wgpu: the GPU backend. Adapter choice, a buffer pool keyed by size class, a pipeline cache keyed by
//! (shader, entry, override constants), deferred command recording with few submits, blocking and async readback.

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

mod adapter;
mod error;
mod gpu;

pub use adapter::{list_adapters, wanted_features, AdapterSummary};
pub use error::{GpuError, Result};
pub use gpu::{
    gpu, grid_1d, select_adapter, thread_stats, BufView, Device, DeviceOptions, Dispatch, Gpu, GpuStats, KernelTime, PooledBuffer, PooledTexture, Readback, Shader, TexView, ThreadStats,
    TEX_ROW_TEXELS,
};
pub use wgpu;
