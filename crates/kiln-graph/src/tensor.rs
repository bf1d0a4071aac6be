//! `Tensor`: a shared handle to GPU storage (a pooled buffer view), a shape, a dtype and, when it was made by an
//! op that needs a gradient, the op that made it (the tape is the graph of these ops).
//!
//! Storage is always contiguous, row-major. `reshape` is free (same storage, new shape); transpose, permute,
//! slice and broadcast run a strided-copy kernel. One layout keeps every kernel simple and the matmul reads
//! transposed operands in place, so the copies left are rare and off the hot path.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_wgpu::{BufView, Device};

use crate::backprop::Op;
use crate::error::{KilnError, Result};
use crate::rng::Rng;
use crate::shape::numel;

pub type TensorId = u64;

/// Values on their way to the host (`Tensor::read_start`).
pub struct PendingValues {
    read: kiln_wgpu::Readback,
    n: usize,
}

impl PendingValues {
    /// Blocks until the values are on the host.
    pub fn wait(self) -> Result<Vec<f32>> {
        let b = self.read.wait()?;
        Ok(bytemuck::pod_collect_to_vec(&b[..self.n * 4]))
    }
}

/// Element type. f32 tensors are differentiable; u32 tensors hold class labels and indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        4
    }
}

pub(crate) struct Inner {
    pub(crate) id: TensorId,
    pub(crate) data: BufView,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) op: Option<Op>,
    pub(crate) requires_grad: bool,
}

#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor#{}{:?} {:?}{}", self.id(), self.shape(), self.dtype(), if self.requires_grad() { " grad" } else { "" })
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static NO_GRAD_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// True unless inside a [`no_grad`] scope.
pub fn grad_enabled() -> bool {
    NO_GRAD_DEPTH.with(|d| d.get() == 0)
}

/// Runs `f` without recording ops for autograd (evaluation, optimizer updates, backward itself).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = NoGradGuard::new();
    f()
}

/// While alive, ops on this thread record no gradients.
pub struct NoGradGuard(());

impl NoGradGuard {
    pub fn new() -> NoGradGuard {
        NO_GRAD_DEPTH.with(|d| d.set(d.get() + 1));
        NoGradGuard(())
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

impl Tensor {
    pub(crate) fn make(data: BufView, shape: Vec<usize>, dtype: DType, op: Option<Op>) -> Tensor {
        if dtype == DType::F32 {
            // Under an anomaly watch (anomaly.rs) only; if the check cannot launch, that op goes unchecked (the
            // error itself, a device problem, shows at the next op that runs).
            let _ = crate::anomaly::check(&data, &shape, || op.as_ref().map(Op::name));
        }
        // Keep the op only when some input needs a gradient and recording is on.
        let op = op.filter(|o| grad_enabled() && o.inputs().iter().any(|t| t.requires_grad()));
        let requires_grad = op.is_some();
        Tensor(Arc::new(Inner { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), data, shape, dtype, op, requires_grad }))
    }

    /// A tensor over existing storage (a parameter's view into a flat buffer, for instance).
    pub fn from_storage(data: BufView, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let need = (numel(shape) * dtype.size()) as u64;
        if data.bytes < need {
            return Err(KilnError::DataLen { op: "from_storage", len: data.bytes as usize / 4, shape: shape.to_vec(), numel: numel(shape) });
        }
        Ok(Tensor::make(data, shape.to_vec(), dtype, None))
    }

    /// Host values on the thread's current device ([`Device::current`]: the default device unless inside a `Device::scope`).
    pub fn from_slice(values: &[f32], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_slice_on(&Device::current()?, values, shape)
    }

    /// Host values on `device`.
    pub fn from_slice_on(device: &Device, values: &[f32], shape: &[usize]) -> Result<Tensor> {
        if values.len() != numel(shape) {
            return Err(KilnError::DataLen { op: "from_slice", len: values.len(), shape: shape.to_vec(), numel: numel(shape) });
        }
        let data = device.upload(bytemuck::cast_slice(values), "tensor upload")?;
        Ok(Tensor::make(data, shape.to_vec(), DType::F32, None))
    }

    pub fn from_u32(values: &[u32], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_u32_on(&Device::current()?, values, shape)
    }

    pub fn from_u32_on(device: &Device, values: &[u32], shape: &[usize]) -> Result<Tensor> {
        if values.len() != numel(shape) {
            return Err(KilnError::DataLen { op: "from_u32", len: values.len(), shape: shape.to_vec(), numel: numel(shape) });
        }
        let data = device.upload(bytemuck::cast_slice(values), "index upload")?;
        Ok(Tensor::make(data, shape.to_vec(), DType::U32, None))
    }

    /// The device this tensor lives on.
    pub fn device(&self) -> &Device {
        self.0.data.device()
    }

    /// This tensor's values on `device` (itself if already there). Cut from the graph: no gradient flows
    /// between devices. Goes through the host, the one path every pair of wgpu devices has.
    pub fn to(&self, device: &Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let bytes = self.read_bytes()?;
        let data = device.upload(&bytes, "tensor copied between devices")?;
        Ok(Tensor::make(data, self.shape().to_vec(), self.dtype(), None))
    }

    /// Several host arrays (4-byte elements: f32 or u32) uploaded with one allocation and one write, each
    /// becoming a tensor over its aligned part of the buffer (a training batch's images and labels).
    pub fn upload_together(parts: &[(&[u8], &[usize], DType)]) -> Result<Vec<Tensor>> {
        Tensor::upload_together_on(&Device::current()?, parts)
    }

    /// [`Tensor::upload_together`] onto `device`.
    pub fn upload_together_on(device: &Device, parts: &[(&[u8], &[usize], DType)]) -> Result<Vec<Tensor>> {
        let g = device;
        let align = g.limits.min_storage_buffer_offset_alignment.max(4) as usize;
        let mut offsets = Vec::with_capacity(parts.len());
        let mut at = 0usize;
        for (bytes, shape, _) in parts {
            if bytes.len() != 4 * numel(shape) {
                return Err(KilnError::DataLen { op: "upload_together", len: bytes.len() / 4, shape: shape.to_vec(), numel: numel(shape) });
            }
            offsets.push(at);
            at = (at + bytes.len().max(4)).div_ceil(align) * align;
        }
        let mut host = vec![0u8; at.max(4)];
        for ((bytes, _, _), &o) in parts.iter().zip(&offsets) {
            host[o..o + bytes.len()].copy_from_slice(bytes);
        }
        let buf = g.upload(&host, "batch upload")?;
        parts.iter().zip(&offsets).map(|((bytes, shape, dtype), &o)| Tensor::from_storage(buf.sub(o as u64, bytes.len().max(4) as u64), shape, *dtype)).collect()
    }

    pub fn scalar(v: f32) -> Result<Tensor> {
        Tensor::from_slice(&[v], &[])
    }

    /// A tensor filled with `value`, made on the GPU (no upload).
    pub fn full(shape: &[usize], value: f32) -> Result<Tensor> {
        Tensor::full_on(&Device::current()?, shape, value)
    }

    /// [`Tensor::full`] on `device`.
    pub fn full_on(device: &Device, shape: &[usize], value: f32) -> Result<Tensor> {
        let n = numel(shape);
        let data = device.alloc(4 * n.max(1) as u64, "full")?;
        let y = crate::kernels::unary(crate::kernels::UnaryKind::Fill, &data, n, value, 0.0)?;
        Ok(Tensor::make(y, shape.to_vec(), DType::F32, None))
    }

    pub fn zeros(shape: &[usize]) -> Result<Tensor> {
        Tensor::full(shape, 0.0)
    }

    pub fn ones(shape: &[usize]) -> Result<Tensor> {
        Tensor::full(shape, 1.0)
    }

    /// Zeros of this tensor's shape on its device.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::full_on(self.device(), self.shape(), 0.0)
    }

    /// Ones of this tensor's shape on its device.
    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::full_on(self.device(), self.shape(), 1.0)
    }

    /// Normal(0, std) values from the host generator (seeded, so runs repeat).
    pub fn randn(shape: &[usize], std: f64, rng: &mut Rng) -> Result<Tensor> {
        let v: Vec<f32> = (0..numel(shape)).map(|_| (rng.normal() * std) as f32).collect();
        Tensor::from_slice(&v, shape)
    }

    /// Uniform [lo, hi) values from the host generator.
    pub fn rand_uniform(shape: &[usize], lo: f64, hi: f64, rng: &mut Rng) -> Result<Tensor> {
        let v: Vec<f32> = (0..numel(shape)).map(|_| rng.range(lo, hi) as f32).collect();
        Tensor::from_slice(&v, shape)
    }

    /// U[0, 1) values generated on the GPU from `seed` (stream position `offset`): no upload, reproducible.
    pub fn rand_gpu(shape: &[usize], seed: u64, offset: u32) -> Result<Tensor> {
        Tensor::rand_gpu_on(&Device::current()?, shape, seed, offset)
    }

    /// [`Tensor::rand_gpu`] on `device`.
    pub fn rand_gpu_on(device: &Device, shape: &[usize], seed: u64, offset: u32) -> Result<Tensor> {
        let y = crate::kernels::random_uniform(device, numel(shape), seed, offset)?;
        Ok(Tensor::make(y, shape.to_vec(), DType::F32, None))
    }

    /// This tensor as a trainable leaf: gradients flow to it. Shares storage.
    pub fn var(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            data: self.0.data.clone(),
            shape: self.0.shape.clone(),
            dtype: self.0.dtype,
            op: None,
            requires_grad: self.0.dtype == DType::F32,
        }))
    }

    /// Same values, cut from the graph: no gradient flows through the result.
    pub fn detach(&self) -> Tensor {
        Tensor::make(self.0.data.clone(), self.0.shape.clone(), self.0.dtype, None)
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.0.shape)
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }
    pub fn storage(&self) -> &BufView {
        &self.0.data
    }
    pub(crate) fn op(&self) -> Option<&Op> {
        self.0.op.as_ref()
    }

    /// The storage trimmed to this tensor's bytes (views can be larger than the tensor).
    pub(crate) fn view(&self) -> BufView {
        let bytes = (self.numel().max(1) * 4) as u64;
        if self.0.data.bytes == bytes {
            self.0.data.clone()
        } else {
            self.0.data.sub(0, bytes.min(self.0.data.bytes))
        }
    }

    fn read_bytes(&self) -> Result<Vec<u8>> {
        if self.numel() == 0 {
            return Ok(Vec::new());
        }
        Ok(self.device().read(&self.view())?)
    }

    /// Copies the values to the host (submits pending work and waits).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.expect_dtype("to_vec", DType::F32)?;
        let b = self.read_bytes()?;
        Ok(bytemuck::pod_collect_to_vec(&b[..self.numel() * 4]))
    }

    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        self.expect_dtype("to_vec_u32", DType::U32)?;
        let b = self.read_bytes()?;
        Ok(bytemuck::pod_collect_to_vec(&b[..self.numel() * 4]))
    }

    /// The single value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return crate::error::invalid("to_scalar", self.shape(), "tensor has more than one element");
        }
        Ok(self.to_vec()?[0])
    }

    /// Starts reading the values back: the copy is submitted now (with everything recorded before it), and
    /// [`PendingValues::wait`] returns them. A training loop reads step n's loss this way and waits for it
    /// only after recording step n + 1, so the host records while the GPU computes.
    pub fn read_start(&self) -> Result<PendingValues> {
        self.expect_dtype("read_start", DType::F32)?;
        Ok(PendingValues { read: self.device().read_start(&self.view())?, n: self.numel() })
    }

    /// Async readback: the copy is submitted now, the future resolves when the bytes are on the host.
    pub fn to_vec_async(&self) -> Result<impl std::future::Future<Output = Result<Vec<f32>>>> {
        self.expect_dtype("to_vec_async", DType::F32)?;
        let n = self.numel();
        let pending = self.device().read_start(&self.view())?;
        Ok(async move {
            let b = pending.await?;
            Ok(bytemuck::pod_collect_to_vec(&b[..n * 4]))
        })
    }

    pub(crate) fn expect_dtype(&self, op: &'static str, dtype: DType) -> Result<()> {
        if self.dtype() != dtype {
            return Err(KilnError::DType { op, expected: dtype, got: self.dtype() });
        }
        Ok(())
    }
}
