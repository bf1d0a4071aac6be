//! Convolution and pooling over NCHW tensors: geometry, the ops, and their backward kernels' launchers.
//! The backward rules themselves are in backprop.rs with every other rule; they call [`conv2d_grads`] and
//! [`pool2d_grad`] here.

use kiln_wgpu::grid_1d;

use crate::backprop::Op;
use crate::error::{invalid, shape_err, Result};
use crate::kernels::{self, launch, out_buffer, ConvGemmSource, Params, CONV2D, POOL};
use crate::tensor::{DType, Tensor};

/// Stride, padding (each side), dilation and groups of a 2-D convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dGeom {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Default for Conv2dGeom {
    fn default() -> Self {
        Conv2dGeom { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 }
    }
}

impl Conv2dGeom {
    /// Output height and width for an input plane and kernel, or None if the kernel does not fit.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let span_h = self.dilation[0] * (kh.max(1) - 1) + 1;
        let span_w = self.dilation[1] * (kw.max(1) - 1) + 1;
        let (ph, pw) = (h + 2 * self.padding[0], w + 2 * self.padding[1]);
        if ph < span_h || pw < span_w || self.stride[0] == 0 || self.stride[1] == 0 {
            return None;
        }
        Some(((ph - span_h) / self.stride[0] + 1, (pw - span_w) / self.stride[1] + 1))
    }
    /// 1x1, stride 1, no padding, one group: a matmul per sample.
    fn is_pointwise(&self, kh: usize, kw: usize) -> bool {
        kh == 1 && kw == 1 && self.stride == [1, 1] && self.padding == [0, 0] && self.groups == 1
    }
}

/// Window, stride and padding of a 2-D pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2dGeom {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    /// Round the output size up (PyTorch's ceil_mode): a last, partial window is kept if it starts inside the
    /// input or its left padding.
    pub ceil_mode: bool,
}

impl Pool2dGeom {
    /// Square window k with stride k and no padding (the common "pool by k").
    pub fn square(k: usize) -> Pool2dGeom {
        Pool2dGeom { kernel: [k, k], stride: [k, k], padding: [0, 0], ceil_mode: false }
    }
    /// Window k, stride s, padding p.
    pub fn new(k: usize, s: usize, p: usize) -> Pool2dGeom {
        Pool2dGeom { kernel: [k, k], stride: [s, s], padding: [p, p], ceil_mode: false }
    }
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let [kh, kw] = self.kernel;
        if kh == 0 || kw == 0 || self.stride[0] == 0 || self.stride[1] == 0 || 2 * self.padding[0] > kh || 2 * self.padding[1] > kw {
            return None;
        }
        let (ph, pw) = (h + 2 * self.padding[0], w + 2 * self.padding[1]);
        if ph < kh || pw < kw {
            return None;
        }
        let side = |padded: usize, k: usize, s: usize, input: usize, pad: usize| {
            let floor = (padded - k) / s + 1;
            if !self.ceil_mode || (padded - k).is_multiple_of(s) {
                return floor;
            }
            // One more window, unless it would start past the input and its left padding.
            if floor * s >= input + pad {
                floor
            } else {
                floor + 1
            }
        };
        Some((side(ph, kh, self.stride[0], h, self.padding[0]), side(pw, kw, self.stride[1], w, self.padding[1])))
    }
}

fn conv_params(x: &[usize], w: &[usize], oh: usize, ow: usize, g: &Conv2dGeom) -> Params {
    Params::new()
        .u32(x[0])
        .u32(x[1])
        .u32(x[2])
        .u32(x[3])
        .u32(w[0])
        .u32(oh)
        .u32(ow)
        .u32(g.groups)
        .u32(w[2])
        .u32(w[3])
        .u32(g.stride[0])
        .u32(g.stride[1])
        .u32(g.padding[0])
        .u32(g.padding[1])
        .u32(g.dilation[0])
        .u32(g.dilation[1])
        .u32(0)
        .u32(oh)
        .u32(0)
        .u32(0)
}

fn pool_params(x: &[usize], oh: usize, ow: usize, g: &Pool2dGeom) -> Params {
    Params::new().u32(x[0] * x[1]).u32(x[2]).u32(x[3]).u32(oh).u32(ow).u32(g.kernel[0]).u32(g.kernel[1]).u32(g.stride[0]).u32(g.stride[1]).u32(g.padding[0]).u32(g.padding[1]).u32(0)
}

impl Tensor {
    /// y = conv2d(x, weight): x [n, c_in, h, w], weight [c_out, c_in / groups, kh, kw] -> [n, c_out, oh, ow].
    /// (Add a bias with `broadcast_add` of a [1, c_out, 1, 1] tensor.)
    pub fn conv2d(&self, weight: &Tensor, geom: Conv2dGeom) -> Result<Tensor> {
        self.expect_dtype("conv2d", DType::F32)?;
        weight.expect_dtype("conv2d", DType::F32)?;
        let (x, w) = (self.shape(), weight.shape());
        if x.len() != 4 || w.len() != 4 {
            return shape_err("conv2d", x, w, "expects input [n, c, h, w] and weight [c_out, c_in/groups, kh, kw]");
        }
        let g = geom.groups;
        if g == 0 || x[1] % g != 0 || w[0] % g != 0 || w[1] != x[1] / g {
            return shape_err("conv2d", x, w, format!("with {g} groups the weight must be [c_out, {}, kh, kw] and c_out divisible by groups", x[1] / g.max(1)));
        }
        if geom.dilation.contains(&0) {
            return invalid("conv2d", w, "dilation must be at least 1");
        }
        let Some((oh, ow)) = geom.output_size(x[2], x[3], w[2], w[3]) else {
            return shape_err("conv2d", x, w, format!("the kernel does not fit the padded input (geometry {geom:?})"));
        };
        let shape = vec![x[0], w[0], oh, ow];
        let mut saved_cols = None;
        let y = if geom.is_pointwise(w[2], w[3]) {
            // out[b] = weight[c_out, c_in] @ x[b][c_in, h*w], the weight shared across the batch.
            let hw = x[2] * x[3];
            kernels::matmul(&weight.view(), &self.view(), x[0], w[0], hw, x[1], 0, x[1] * hw, false, false)?
        } else if geom.groups == 1 && kernels::conv_gemm_preferred(self.view().device())? {
            // out[b] = weight[c_out, c_in*kh*kw] @ im2col(x)[b], the columns gathered on the fly.
            let (k, spatial) = (x[1] * w[2] * w[3], oh * ow);
            kernels::conv_gemm(ConvGemmSource::Forward, &weight.view(), &self.view(), x[0], w[0], spatial, k, 0, x[1] * x[2] * x[3], gemm_geometry(x, w, oh, ow, &geom))?
        } else if geom.groups == 1 {
            // out[b] = weight[c_out, c_in*kh*kw] @ im2col(x)[b]
            let cols = im2col(self, w, oh, ow, &geom)?;
            let (k, spatial) = (x[1] * w[2] * w[3], oh * ow);
            let y = kernels::matmul(&weight.view(), &cols, x[0], w[0], spatial, k, 0, k * spatial, false, false)?;
            // The weight's gradient needs these columns again: small ones are kept with the op rather than
            // redone in the backward pass (LeNet-5's step on lavapipe: 136 -> 119 ms); large ones are cheaper to
            // redo than to hold (ResNet-20's 29 MB columns: no faster, peak memory 205 -> 548 MB).
            if weight.requires_grad() && 4 * x[0] * k * spatial <= SAVED_COLS_MAX_BYTES {
                saved_cols = Some(cols);
            }
            y
        } else {
            let n = shape.iter().product::<usize>();
            let y = out_buffer(&self.view(), n, "conv2d output")?;
            launch(&CONV2D, "conv2d_forward", &[], conv_params(x, w, oh, ow, &geom), &[&self.view(), &weight.view()], &[&y], grid_1d(n as u64, 256))?;
            y
        };
        Ok(Tensor::make(y, shape, DType::F32, Some(Op::Conv2d(self.clone(), weight.clone(), geom, saved_cols))))
    }

    /// PyTorch's `conv_transpose2d`: x [n, c_in, h, w], weight [c_in, c_out / groups, kh, kw] ->
    /// [n, c_out, (h - 1) stride - 2 padding + dilation (kh - 1) + output_padding + 1, (the same for w)]: the
    /// adjoint of `conv2d` with that weight and geometry (it runs as conv2d's input gradient, so its
    /// backward is conv2d for x and conv2d's weight gradient for the weight). `output_padding` must be
    /// smaller than the stride.
    pub fn conv_transpose2d(&self, weight: &Tensor, geom: Conv2dGeom, output_padding: [usize; 2]) -> Result<Tensor> {
        self.expect_dtype("conv_transpose2d", DType::F32)?;
        weight.expect_dtype("conv_transpose2d", DType::F32)?;
        let (x, w) = (self.shape(), weight.shape());
        if x.len() != 4 || w.len() != 4 {
            return shape_err("conv_transpose2d", x, w, "expects input [n, c_in, h, w] and weight [c_in, c_out/groups, kh, kw]");
        }
        let g = geom.groups;
        if g == 0 || w[0] != x[1] || x[1] % g != 0 {
            return shape_err("conv_transpose2d", x, w, format!("the weight must be [c_in = {}, c_out/groups, kh, kw] and c_in divisible by {g} groups", x[1]));
        }
        if geom.dilation.contains(&0) || geom.stride.contains(&0) {
            return invalid("conv_transpose2d", w, "stride and dilation must be at least 1");
        }
        if x[2..].contains(&0) || w[2..].contains(&0) {
            return shape_err("conv_transpose2d", x, w, "the input and the kernel must be at least 1 x 1");
        }
        if output_padding[0] >= geom.stride[0] || output_padding[1] >= geom.stride[1] {
            return invalid("conv_transpose2d", x, format!("output_padding {output_padding:?} must be smaller than the stride {:?}", geom.stride));
        }
        let size = |i: usize, k: usize, d: usize| -> Option<usize> {
            let full = (x[2 + d] - 1) * geom.stride[d] + geom.dilation[d] * (k - 1) + output_padding[d] + 1;
            full.checked_sub(2 * geom.padding[d]).filter(|&v| v > 0 && i > 0)
        };
        let (Some(oh), Some(ow)) = (size(x[2], w[2], 0), size(x[3], w[3], 1)) else {
            return shape_err("conv_transpose2d", x, w, format!("the output would be empty (geometry {geom:?}, output_padding {output_padding:?})"));
        };
        let out_shape = vec![x[0], w[1] * g, oh, ow];
        let y = conv2d_input_grad_raw(self, weight, &geom, &out_shape)?;
        Ok(Tensor::make(y, out_shape.clone(), DType::F32, Some(Op::Conv2dInputGrad(self.clone(), weight.clone(), geom, out_shape))))
    }

    /// Max pooling; returns the pooled values and the argmax "switches" (u32 indices into each input plane).
    pub fn max_pool2d(&self, geom: Pool2dGeom) -> Result<(Tensor, Tensor)> {
        let (shape, params) = self.pool_setup("max_pool2d", &geom)?;
        let n = shape.iter().product::<usize>();
        let y = out_buffer(&self.view(), n, "max_pool2d output")?;
        let sw = out_buffer(&self.view(), n, "max_pool2d switches")?;
        launch(&POOL, "max_pool2d_forward", &[], params, &[&self.view()], &[&y, &sw], grid_1d(n as u64, 256))?;
        let switches = Tensor::make(sw, shape.clone(), DType::U32, None);
        let values = Tensor::make(y, shape, DType::F32, Some(Op::MaxPool2d(self.clone(), switches.clone(), geom)));
        Ok((values, switches))
    }

    /// Average pooling (the divisor is always kh*kw, padding included).
    pub fn avg_pool2d(&self, geom: Pool2dGeom) -> Result<Tensor> {
        let (shape, params) = self.pool_setup("avg_pool2d", &geom)?;
        let n = shape.iter().product::<usize>();
        let y = out_buffer(&self.view(), n, "avg_pool2d output")?;
        launch(&POOL, "avg_pool2d_forward", &[], params, &[&self.view()], &[&y], grid_1d(n as u64, 256))?;
        Ok(Tensor::make(y, shape, DType::F32, Some(Op::AvgPool2d(self.clone(), geom))))
    }

    /// Mean over each channel plane: [n, c, h, w] -> [n, c].
    pub fn global_avg_pool2d(&self) -> Result<Tensor> {
        if self.rank() != 4 {
            return invalid("global_avg_pool2d", self.shape(), "expects [n, c, h, w]");
        }
        self.mean(&[2, 3], false)
    }

    fn pool_setup(&self, op: &'static str, geom: &Pool2dGeom) -> Result<(Vec<usize>, Params)> {
        self.expect_dtype(op, DType::F32)?;
        let x = self.shape();
        if x.len() != 4 {
            return invalid(op, x, "expects [n, c, h, w]");
        }
        let Some((oh, ow)) = geom.output_size(x[2], x[3]) else {
            return invalid(op, x, format!("window {geom:?} does not fit (padding must be at most half the window)"));
        };
        Ok((vec![x[0], x[1], oh, ow], pool_params(x, oh, ow, geom)))
    }
}

/// The largest im2col buffer a convolution keeps from its forward pass for its weight's gradient.
pub const SAVED_COLS_MAX_BYTES: usize = 6 << 20;

/// cols [n, c_in*kh*kw, oh*ow] of x for a weight of shape `w` (groups = 1).
fn im2col(x: &Tensor, w: &[usize], oh: usize, ow: usize, geom: &Conv2dGeom) -> Result<kiln_wgpu::BufView> {
    let xs = x.shape();
    let n = xs[0] * xs[1] * w[2] * w[3] * oh * ow;
    let cols = out_buffer(&x.view(), n, "im2col columns")?;
    // One invocation per output row (see conv2d.wgsl).
    let rows = xs[0] * xs[1] * w[2] * w[3] * oh;
    launch(&CONV2D, "im2col", &[], conv_params(xs, w, oh, ow, geom), &[&x.view()], &[&cols], grid_1d(rows as u64, 256))?;
    Ok(cols)
}

/// Gradients of conv2d with respect to its input and weight; each only when that tensor requires one
/// (a network's first layer needs no gradient for its input images).
pub fn conv2d_grads(x: &Tensor, w: &Tensor, g: &Tensor, geom: &Conv2dGeom) -> Result<(Option<Tensor>, Option<Tensor>)> {
    conv2d_grads_with(x, w, g, geom, None)
}

/// [`conv2d_grads`] with the forward pass's im2col columns of x, when it kept them.
pub(crate) fn conv2d_grads_with(x: &Tensor, w: &Tensor, g: &Tensor, geom: &Conv2dGeom, cols: Option<&kiln_wgpu::BufView>) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let wrap = |buf, shape: &[usize]| Tensor::make(buf, shape.to_vec(), DType::F32, None);
    let gw = if w.requires_grad() { Some(wrap(weight_grad_raw(x, g, geom, w.shape(), cols)?, w.shape())) } else { None };
    let gx = if x.requires_grad() { Some(wrap(conv2d_input_grad_raw(g, w, geom, x.shape())?, x.shape())) } else { None };
    Ok((gx, gw))
}

/// conv2d's input gradient (of shape `xs`) from the output's gradient `g` and the weight.
pub(crate) fn conv2d_input_grad_raw(g: &Tensor, w: &Tensor, geom: &Conv2dGeom, xs: &[usize]) -> Result<kiln_wgpu::BufView> {
    let (ws, ys) = (w.shape(), g.shape());
    let (oh, ow) = (ys[2], ys[3]);
    let (batch, n_x) = (xs[0], xs.iter().product::<usize>());
    if geom.is_pointwise(ws[2], ws[3]) {
        // grad_x[b] = weight^T @ grad_y[b]
        let hw = xs[2] * xs[3];
        return kernels::matmul(&w.view(), &g.view(), batch, xs[1], hw, ws[0], 0, ws[0] * hw, true, false);
    }
    if geom.groups == 1 && kernels::conv_gemm_preferred(g.view().device())? && geom.stride == [1, 1] {
        // weight permuted to [c_in, c_out*kh*kw] @ grad_y gathered per input position (conv_gemm).
        let (taps, spatial) = (ws[2] * ws[3], oh * ow);
        let per_sample = ws.iter().product::<usize>();
        let permuted = out_buffer(&w.view(), per_sample, "conv2d weight, permuted")?;
        kernels::strided_copy(&w.view(), 0, &[taps, xs[1] * taps, 1], &permuted, 0, &[ws[0] * taps, taps, 1], &[xs[1], ws[0], taps])?;
        return kernels::conv_gemm(ConvGemmSource::InputGrad, &permuted, &g.view(), batch, xs[1], xs[2] * xs[3], ws[0] * taps, 0, ws[0] * spatial, gemm_geometry(xs, ws, oh, ow, geom));
    }
    if geom.groups == 1 {
        return col2im_grad(w, g, xs, ws, oh, ow, geom);
    }
    let buf = out_buffer(&g.view(), n_x, "conv2d input gradient")?;
    launch(&CONV2D, "conv2d_backward_input", &[], conv_params(xs, ws, oh, ow, geom), &[&g.view(), &w.view()], &[&buf], grid_1d(n_x as u64, 256))?;
    Ok(buf)
}

/// conv2d's weight gradient (of shape `ws`) from the input and the output's gradient `g`.
pub(crate) fn conv2d_weight_grad_raw(x: &Tensor, g: &Tensor, geom: &Conv2dGeom, ws: &[usize]) -> Result<kiln_wgpu::BufView> {
    weight_grad_raw(x, g, geom, ws, None)
}

/// The weight gradient, reusing the forward pass's im2col columns of x when it kept them: per-sample partial
/// products summed over the batch.
fn weight_grad_raw(x: &Tensor, g: &Tensor, geom: &Conv2dGeom, ws: &[usize], cols: Option<&kiln_wgpu::BufView>) -> Result<kiln_wgpu::BufView> {
    let (xs, ys) = (x.shape(), g.shape());
    let (oh, ow) = (ys[2], ys[3]);
    let batch = xs[0];
    let per_sample = ws.iter().product::<usize>();
    let (k, spatial) = (xs[1] * ws[2] * ws[3], oh * ow);
    let partial = if geom.is_pointwise(ws[2], ws[3]) {
        // partial[b] = grad_y[b] @ x[b]^T
        let hw = xs[2] * xs[3];
        kernels::matmul(&g.view(), &x.view(), batch, ws[0], xs[1], hw, ws[0] * hw, xs[1] * hw, false, true)?
    } else if geom.groups == 1 && kernels::conv_gemm_preferred(x.view().device())? {
        // partial[b] = grad_y[b] @ im2col(x)[b]^T, the columns gathered on the fly.
        kernels::conv_gemm(ConvGemmSource::WeightGrad, &g.view(), &x.view(), batch, ws[0], k, spatial, ws[0] * spatial, xs[1] * xs[2] * xs[3], gemm_geometry(xs, ws, oh, ow, geom))?
    } else if geom.groups == 1 {
        // Through im2col: partial[b] = grad_y[b] @ cols[b]^T.
        let cols = match cols {
            Some(c) => c.clone(),
            None => im2col(x, ws, oh, ow, geom)?,
        };
        kernels::matmul(&g.view(), &cols, batch, ws[0], k, spatial, ws[0] * spatial, k * spatial, false, true)?
    } else {
        let buf = out_buffer(&g.view(), batch * per_sample, "conv2d weight gradient (per sample)")?;
        // Rows of the output map per dispatch, so each invocation loops under kernels::LOOP_CHUNK * 4 times.
        let rows = (4 * kernels::LOOP_CHUNK / (ow + 1)).max(1);
        for (i, oy0) in (0..oh).step_by(rows).enumerate() {
            let mut p = conv_params(xs, ws, oh, ow, geom);
            p.set_u32(16, oy0);
            p.set_u32(17, (oy0 + rows).min(oh));
            p.set_u32(18, (i > 0) as usize);
            launch(&CONV2D, "conv2d_backward_weight", &[], p, &[&g.view(), &x.view()], &[&buf], grid_1d((batch * per_sample) as u64, 256))?;
        }
        buf
    };
    kernels::reduce(&partial, 1, batch, per_sample, false, 1.0)
}

/// grad_x through im2col's transpose: grad_cols[b] = weight^T @ grad_y[b], then col2im sums the columns back.
fn col2im_grad(w: &Tensor, g: &Tensor, xs: &[usize], ws: &[usize], oh: usize, ow: usize, geom: &Conv2dGeom) -> Result<kiln_wgpu::BufView> {
    let (k, spatial) = (xs[1] * ws[2] * ws[3], oh * ow);
    let grad_cols = kernels::matmul(&w.view(), &g.view(), xs[0], k, spatial, ws[0], 0, ws[0] * spatial, true, false)?;
    let buf = out_buffer(&g.view(), xs.iter().product(), "conv2d input gradient")?;
    // One invocation per 64-wide segment of an input row (see conv2d.wgsl).
    let segments = xs[3].div_ceil(64);
    launch(&CONV2D, "col2im", &[], conv_params(xs, ws, oh, ow, geom), &[&grad_cols], &[&buf], grid_1d((xs[0] * xs[1] * xs[2] * segments) as u64, 256))?;
    Ok(buf)
}

/// [c_in, h, w, kh, kw, oh, ow, stride, padding, dilation] of a convolution, as `kernels::conv_gemm` takes it.
fn gemm_geometry(x: &[usize], w: &[usize], oh: usize, ow: usize, g: &Conv2dGeom) -> [usize; 13] {
    [x[1], x[2], x[3], w[2], w[3], oh, ow, g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1]]
}

/// Gradient of max pooling (given its switches) or average pooling (switches None).
pub fn pool2d_grad(x: &Tensor, switches: Option<&Tensor>, g: &Tensor, geom: &Pool2dGeom) -> Result<Tensor> {
    Ok(Tensor::make(pool2d_grad_raw(x.shape(), switches, g, geom)?, x.shape().to_vec(), DType::F32, None))
}

/// [`pool2d_grad`] for an input of shape `xs`.
pub(crate) fn pool2d_grad_raw(xs: &[usize], switches: Option<&Tensor>, g: &Tensor, geom: &Pool2dGeom) -> Result<kiln_wgpu::BufView> {
    let (oh, ow) = (g.shape()[2], g.shape()[3]);
    let n = xs.iter().product::<usize>();
    let gx = out_buffer(&g.view(), n, "pool gradient")?;
    let params = pool_params(xs, oh, ow, geom);
    match switches {
        Some(s) => launch(&POOL, "max_pool2d_backward", &[], params, &[&g.view(), &s.view()], &[&gx], grid_1d(n as u64, 256))?,
        None => launch(&POOL, "avg_pool2d_backward", &[], params, &[&g.view()], &[&gx], grid_1d(n as u64, 256))?,
    }
    Ok(gx)
}

/// Values of `src` [n, c, h, w] at max pooling's switches: [n, c, oh, ow] (the adjoint of max pooling's
/// gradient, for second derivatives).
pub(crate) fn max_pool2d_gather_raw(src: &Tensor, switches: &Tensor, geom: &Pool2dGeom) -> Result<kiln_wgpu::BufView> {
    let ys = switches.shape();
    let n = ys.iter().product::<usize>();
    let out = out_buffer(&src.view(), n, "max pool gather")?;
    launch(&POOL, "max_pool2d_gather", &[], pool_params(src.shape(), ys[2], ys[3], geom), &[&src.view(), &switches.view()], &[&out], grid_1d(n as u64, 256))?;
    Ok(out)
}
