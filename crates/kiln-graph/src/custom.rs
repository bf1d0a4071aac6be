//! The open op set: a differentiable op defined outside kiln-graph, with its own WGSL kernels and backward rule.
//!
//! A crate implements [`CustomOp`] (a forward and a backward, each free to launch its own kernels through
//! [`launch`] or to compose tensor ops) and applies it with [`Tensor::custom_op`]. The tape records it like a
//! built-in op; [`crate::gradcheck`] checks it. `examples/custom_op` writes SiLU this way.
//!
//! Kiln's own fused ops (bias+activation, batch norm, cross-entropy) stay on the internal path (`Op` and
//! `backprop.rs`): see docs/library.md, "Custom ops", for why.

use std::sync::Arc;

use kiln_wgpu::Shader;

use crate::error::{KilnError, Result};
pub use crate::kernels::Params;
use crate::tensor::{no_grad, DType, Tensor};

/// A differentiable op from outside kiln-graph.
pub trait CustomOp: Send + Sync + 'static {
    /// The op's name, for errors.
    fn name(&self) -> &str;

    /// The output from the inputs. Runs without recording: what it computes is the op's value, whatever
    /// kernels or tensor ops it uses. Validate shapes here and return an error naming both.
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor>;

    /// The gradient with respect to each input (`None` for an input that needs none, or a non-f32 one), given
    /// the inputs, the output and the gradient of the loss with respect to the output. Called during
    /// `backward`; under `backward_create_graph` the tensor ops it uses are recorded, so it is differentiable
    /// again exactly when it is written with differentiable tensor ops (raw kernels are not).
    fn backward(&self, inputs: &[&Tensor], output: &Tensor, grad_output: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

impl Tensor {
    /// Applies a [`CustomOp`] and records it on the tape.
    pub fn custom_op(op: impl CustomOp, inputs: &[&Tensor]) -> Result<Tensor> {
        Tensor::custom_op_arc(Arc::new(op), inputs)
    }

    /// [`Tensor::custom_op`] with a shared op (one value applied many times).
    pub fn custom_op_arc(op: Arc<dyn CustomOp>, inputs: &[&Tensor]) -> Result<Tensor> {
        if let Some(first) = inputs.first() {
            for t in &inputs[1..] {
                if t.device() != first.device() {
                    return Err(kiln_wgpu::GpuError::CrossDevice { what: "custom op input".into(), a: first.device().describe(), b: t.device().describe() }.into());
                }
            }
        }
        let y = no_grad(|| op.forward(inputs))?;
        let record = crate::backprop::Op::Custom(op, inputs.iter().map(|t| (*t).clone()).collect());
        Ok(Tensor::make(y.storage().clone(), y.shape().to_vec(), y.dtype(), Some(record)))
    }
}

/// Checks a custom op's gradients against its inputs' shapes.
/// Under `backward_create_graph` (`create_graph`), a gradient that does not require one although its input
/// or the incoming gradient does was made by raw kernels: its second-order terms would be lost silently, so it
/// is an error instead.
pub(crate) fn checked_grads<'a>(op: &dyn CustomOp, inputs: &'a [Tensor], output: &Tensor, g: &Tensor, create_graph: bool) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let grads = op.backward(&refs, output, g)?;
    if grads.len() != inputs.len() {
        return Err(KilnError::Backward(format!("custom op {}: backward returned {} gradients for {} inputs", op.name(), grads.len(), inputs.len())));
    }
    let mut out = Vec::with_capacity(inputs.len());
    for (i, (x, gx)) in inputs.iter().zip(grads).enumerate() {
        let Some(gx) = gx else { continue };
        if gx.shape() != x.shape() {
            return Err(KilnError::Backward(format!("custom op {}: the gradient of input {i} has shape {:?}, the input {:?}", op.name(), gx.shape(), x.shape())));
        }
        if create_graph && (x.requires_grad() || g.requires_grad()) && !gx.requires_grad() {
            return Err(KilnError::Backward(format!(
                "custom op {}: its backward is not differentiable (raw kernels), so backward_create_graph cannot record it; write the backward with tensor ops for second derivatives",
                op.name()
            )));
        }
        out.push((x, gx));
    }
    Ok(out)
}

/// Runs one entry point of a WGSL shader on tensors: binding 0 is `params` (a uniform; [`Params`] writes its
/// fields in order), then each input as `var<storage, read>`, then one fresh f32 output per shape in
/// `output_shapes` as `var<storage, read_write>`. The outputs live on the inputs' device (inputs must not be
/// empty); `workgroups` is the grid ([`grid_1d`] for one thread per element). Each static [`Shader`] is
/// compiled once per device.
pub fn launch(shader: &'static Shader, entry: &'static str, params: Params, inputs: &[&Tensor], output_shapes: &[&[usize]], workgroups: [u32; 3]) -> Result<Vec<Tensor>> {
    let Some(first) = inputs.first() else {
        return Err(KilnError::Usage(format!("kernel {entry} of {}: launch needs at least one input", shader.name)));
    };
    let outputs: Vec<Tensor> = output_shapes
        .iter()
        .map(|s| {
            let buf = crate::kernels::out_buffer(&first.view(), crate::shape::numel(s), entry)?;
            Tensor::from_storage(buf, s, DType::F32)
        })
        .collect::<Result<_>>()?;
    let in_views: Vec<kiln_wgpu::BufView> = inputs.iter().map(|t| t.view()).collect();
    let out_views: Vec<kiln_wgpu::BufView> = outputs.iter().map(|t| t.view()).collect();
    crate::kernels::launch(shader, entry, &[], params, &in_views.iter().collect::<Vec<_>>(), &out_views.iter().collect::<Vec<_>>(), workgroups)?;
    Ok(outputs)
}

pub use kiln_wgpu::grid_1d;
