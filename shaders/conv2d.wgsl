// 2-D convolution, direct (one invocation per output element), NCHW, with stride, padding, dilation and
// groups. 1x1 convolutions with stride 1 and no padding do not come here: they run as a matmul.
//   x: [n, c_in, h, w]   weight: [c_out, c_in / groups, kh, kw]   y: [n, c_out, oh, ow]
// oh = (h + 2*pad_h - dil_h*(kh-1) - 1) / stride_h + 1, likewise ow.

struct ConvParams {
    n: u32, c_in: u32, h: u32, w: u32,
    c_out: u32, oh: u32, ow: u32, groups: u32,
    kh: u32, kw: u32, stride_h: u32, stride_w: u32,
    pad_h: u32, pad_w: u32, dil_h: u32, dil_w: u32,
    // conv2d_backward_weight sums output rows [oy_begin, oy_end) and adds to its output when `accumulate` is
    // set: the launcher splits tall maps over several dispatches (lavapipe's 65535-iteration loop cap).
    oy_begin: u32, oy_end: u32, accumulate: u32, _pad: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> cp: ConvParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * WG; }

// (x, y, channel, sample) of element i of an input [n, c_in, h, w].
fn input_coords(i: u32) -> vec4<u32> {
    return vec4<u32>(i % cp.w, (i / cp.w) % cp.h, (i / (cp.w * cp.h)) % cp.c_in, i / (cp.w * cp.h * cp.c_in));
}

// The input position (along one axis) that output position `o` reads through kernel tap `tap` (may be outside).
fn tap_input(o: u32, tap: u32, stride: u32, dil: u32, pad: u32) -> i32 {
    return i32(o * stride + tap * dil) - i32(pad);
}

// The output position (along one axis) whose kernel tap `tap` reads input position `pos`, or -1 if none.
fn tap_output(pos: u32, pad: u32, tap: u32, dil: u32, stride: u32, count: u32) -> i32 {
    let t = i32(pos + pad) - i32(tap * dil);
    if (t < 0 || t % i32(stride) != 0) { return -1; }
    let o = t / i32(stride);
    if (o >= i32(count)) { return -1; }
    return o;
}

// y[b, co, oy, ox] = sum_{ci, ky, kx} x[b, g*cig + ci, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw] * weight[co, ci, ky, kx]
@compute @workgroup_size(WG)
fn conv2d_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= cp.n * cp.c_out * cp.oh * cp.ow) { return; }
    let ox = i % cp.ow;
    let oy = (i / cp.ow) % cp.oh;
    let co = (i / (cp.ow * cp.oh)) % cp.c_out;
    let b = i / (cp.ow * cp.oh * cp.c_out);
    let cig = cp.c_in / cp.groups;
    let g = co / (cp.c_out / cp.groups);
    var acc = 0.0;
    for (var ci = 0u; ci < cig; ci = ci + 1u) {
        let x_plane = (b * cp.c_in + g * cig + ci) * cp.h;
        let w_base = (co * cig + ci) * cp.kh;
        for (var ky = 0u; ky < cp.kh; ky = ky + 1u) {
            let iy = tap_input(oy, ky, cp.stride_h, cp.dil_h, cp.pad_h);
            if (iy < 0 || iy >= i32(cp.h)) { continue; }
            for (var kx = 0u; kx < cp.kw; kx = kx + 1u) {
                let ix = tap_input(ox, kx, cp.stride_w, cp.dil_w, cp.pad_w);
                if (ix < 0 || ix >= i32(cp.w)) { continue; }
                acc = fma(x[(x_plane + u32(iy)) * cp.w + u32(ix)], weight[(w_base + ky) * cp.kw + kx], acc);
            }
        }
    }
    y[i] = acc;
}

// grad_x[b, c, iy, ix] = sum over (co in c's group, ky, kx) with oy = (iy + ph - ky*dh) / sh integral and in
// range (likewise ox) of grad_y[b, co, oy, ox] * weight[co, c - g*cig, ky, kx].
//   grad_y: [n, c_out, oh, ow] (binding 1)   weight (binding 2)   grad_x: [n, c_in, h, w] (binding 3)
@group(0) @binding(1) var<storage, read> grad_y: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad_x: array<f32>;

@compute @workgroup_size(WG)
fn conv2d_backward_input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= cp.n * cp.c_in * cp.h * cp.w) { return; }
    let at = input_coords(i);
    let ix = at.x;
    let iy = at.y;
    let c = at.z;
    let b = at.w;
    let cig = cp.c_in / cp.groups;
    let cog = cp.c_out / cp.groups;
    let g = c / cig;
    let ci = c % cig;
    var acc = 0.0;
    for (var ky = 0u; ky < cp.kh; ky = ky + 1u) {
        let oy_signed = tap_output(iy, cp.pad_h, ky, cp.dil_h, cp.stride_h, cp.oh);
        if (oy_signed < 0) { continue; }
        let oy = u32(oy_signed);
        for (var kx = 0u; kx < cp.kw; kx = kx + 1u) {
            let ox_signed = tap_output(ix, cp.pad_w, kx, cp.dil_w, cp.stride_w, cp.ow);
            if (ox_signed < 0) { continue; }
            let ox = u32(ox_signed);
            for (var k = 0u; k < cog; k = k + 1u) {
                let co = g * cog + k;
                acc = fma(grad_y[((b * cp.c_out + co) * cp.oh + oy) * cp.ow + ox], weight[((co * cig + ci) * cp.kh + ky) * cp.kw + kx], acc);
            }
        }
    }
    grad_x[i] = acc;
}

// Per-sample weight gradients, summed over the batch by a reduction afterwards (more parallel work than one
// invocation per weight looping over the whole batch):
// partial[b, co, ci, ky, kx] = sum_{oy, ox} grad_y[b, co, oy, ox] * x[b, g*cig + ci, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw]
//   grad_y (binding 1)   x (binding 2)   partial: [n, c_out, c_in/groups, kh, kw] (binding 3)
@group(0) @binding(2) var<storage, read> x_saved: array<f32>;
@group(0) @binding(3) var<storage, read_write> partial: array<f32>;

@compute @workgroup_size(WG)
fn conv2d_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let cig = cp.c_in / cp.groups;
    let per_sample = cp.c_out * cig * cp.kh * cp.kw;
    let i = linear_id(gid, nwg);
    if (i >= cp.n * per_sample) { return; }
    let kx = i % cp.kw;
    let ky = (i / cp.kw) % cp.kh;
    let ci = (i / (cp.kw * cp.kh)) % cig;
    let co = (i / (cp.kw * cp.kh * cig)) % cp.c_out;
    let b = i / per_sample;
    let g = co / (cp.c_out / cp.groups);
    let x_plane = (b * cp.c_in + g * cig + ci) * cp.h;
    let y_plane = (b * cp.c_out + co) * cp.oh;
    var acc = select(0.0, partial[i], cp.accumulate != 0u);
    for (var oy = cp.oy_begin; oy < cp.oy_end; oy = oy + 1u) {
        let iy = tap_input(oy, ky, cp.stride_h, cp.dil_h, cp.pad_h);
        if (iy < 0 || iy >= i32(cp.h)) { continue; }
        for (var ox = 0u; ox < cp.ow; ox = ox + 1u) {
            let ix = tap_input(ox, kx, cp.stride_w, cp.dil_w, cp.pad_w);
            if (ix < 0 || ix >= i32(cp.w)) { continue; }
            acc = fma(grad_y[(y_plane + oy) * cp.ow + ox], x_saved[(x_plane + u32(iy)) * cp.w + u32(ix)], acc);
        }
    }
    partial[i] = acc;
}

// ---- im2col / col2im: convolution as a matmul (groups = 1) ------------------------------------------------
// cols[b, (ci*kh + ky)*kw + kx, oy*ow + ox] = x[b, ci, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw] (0 outside)
// so that y[b] = weight[c_out, c_in*kh*kw] @ cols[b], grad_weight = sum_b grad_y[b] @ cols[b]^T and
// grad_cols[b] = weight^T @ grad_y[b].
//   x (binding 1) -> cols: [n, c_in*kh*kw, oh*ow] (binding 2)
@group(0) @binding(2) var<storage, read_write> cols: array<f32>;

// One invocation per output row (b, ci, ky, kx, oy), looping over ox: the index arithmetic (runtime integer
// division, which lavapipe runs lane by lane) is paid once per row instead of once per element.
@compute @workgroup_size(WG)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_id(gid, nwg);
    let rows = cp.c_in * cp.kh * cp.kw;
    if (row >= cp.n * rows * cp.oh) { return; }
    let oy = row % cp.oh;
    let r = (row / cp.oh) % rows;
    let b = row / (cp.oh * rows);
    let kx = r % cp.kw;
    let ky = (r / cp.kw) % cp.kh;
    let ci = r / (cp.kw * cp.kh);
    let out_base = ((b * rows + r) * cp.oh + oy) * cp.ow;
    let iy = tap_input(oy, ky, cp.stride_h, cp.dil_h, cp.pad_h);
    if (iy < 0 || iy >= i32(cp.h)) {
        for (var ox = 0u; ox < cp.ow; ox = ox + 1u) { cols[out_base + ox] = 0.0; }
        return;
    }
    let in_base = ((b * cp.c_in + ci) * cp.h + u32(iy)) * cp.w;
    for (var ox = 0u; ox < cp.ow; ox = ox + 1u) {
        let ix = tap_input(ox, kx, cp.stride_w, cp.dil_w, cp.pad_w);
        var v = 0.0;
        if (ix >= 0 && ix < i32(cp.w)) { v = x[in_base + u32(ix)]; }
        cols[out_base + ox] = v;
    }
}

// grad_x[b, c, iy, ix] = sum over (ky, kx) whose output position is integral and in range of
// grad_cols[b, (c*kh + ky)*kw + kx, oy*ow + ox].
//   grad_cols (binding 1) -> grad_x: [n, c_in, h, w] (binding 2)
@group(0) @binding(1) var<storage, read> grad_cols: array<f32>;
@group(0) @binding(2) var<storage, read_write> col2im_out: array<f32>;

// One invocation per 64-wide segment of an input row (b, c, iy), looping over its ix and the taps with the
// sum in a register; the output row each ky reads is found once per (ky, ix), and with stride 1 (the usual
// case) without any division. Segments keep each invocation's loops far under lavapipe's 65535-iteration cap.
const COL2IM_SEGMENT: u32 = 64u;

fn source_position(pos: u32, pad: u32, tap: u32, dil: u32, stride: u32, count: u32) -> i32 {
    if (stride == 1u) {
        let o = i32(pos + pad) - i32(tap * dil);
        return select(-1, o, o < i32(count));
    }
    return tap_output(pos, pad, tap, dil, stride, count);
}

@compute @workgroup_size(WG)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    let segments = (cp.w + COL2IM_SEGMENT - 1u) / COL2IM_SEGMENT;
    if (id >= cp.n * cp.c_in * cp.h * segments) { return; }
    let row = id / segments;
    let ix0 = (id % segments) * COL2IM_SEGMENT;
    let iy = row % cp.h;
    let c = (row / cp.h) % cp.c_in;
    let b = row / (cp.h * cp.c_in);
    let spatial = cp.oh * cp.ow;
    let rows = cp.c_in * cp.kh * cp.kw;
    let plane = (b * rows + c * cp.kh * cp.kw) * spatial;
    for (var ix = ix0; ix < min(ix0 + COL2IM_SEGMENT, cp.w); ix = ix + 1u) {
        var acc = 0.0;
        for (var ky = 0u; ky < cp.kh; ky = ky + 1u) {
            let oy = source_position(iy, cp.pad_h, ky, cp.dil_h, cp.stride_h, cp.oh);
            if (oy < 0) { continue; }
            for (var kx = 0u; kx < cp.kw; kx = kx + 1u) {
                let ox = source_position(ix, cp.pad_w, kx, cp.dil_w, cp.stride_w, cp.ow);
                if (ox >= 0) { acc = acc + grad_cols[plane + (ky * cp.kw + kx) * spatial + u32(oy) * cp.ow + u32(ox)]; }
            }
        }
        col2im_out[row * cp.w + ix] = acc;
    }
}
