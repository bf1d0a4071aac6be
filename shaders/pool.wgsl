// 2-D pooling over NCHW planes: max pooling (returning the argmax "switches" as indices into the input plane,
// PyTorch's convention, so max-unpooling can use them) and average pooling (count_include_pad: the divisor is
// always kh*kw). Padding positions never win a max.
//   x: [n, c, h, w] -> y: [n, c, oh, ow], oh = (h + 2*pad_h - kh) / stride_h + 1

struct PoolParams {
    planes: u32, h: u32, w: u32, oh: u32,
    ow: u32, kh: u32, kw: u32, stride_h: u32,
    stride_w: u32, pad_h: u32, pad_w: u32, _pad: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> pp: PoolParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> switches: array<u32>;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * WG; }

@compute @workgroup_size(WG)
fn max_pool2d_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= pp.planes * pp.oh * pp.ow) { return; }
    let ox = i % pp.ow;
    let oy = (i / pp.ow) % pp.oh;
    let plane = i / (pp.ow * pp.oh);
    var best = -3.4028235e38;
    var best_at = 0xffffffffu;
    for (var ky = 0u; ky < pp.kh; ky = ky + 1u) {
        let iy = i32(oy * pp.stride_h + ky) - i32(pp.pad_h);
        if (iy < 0 || iy >= i32(pp.h)) { continue; }
        for (var kx = 0u; kx < pp.kw; kx = kx + 1u) {
            let ix = i32(ox * pp.stride_w + kx) - i32(pp.pad_w);
            if (ix < 0 || ix >= i32(pp.w)) { continue; }
            let at = u32(iy) * pp.w + u32(ix);
            let v = x[plane * pp.h * pp.w + at];
            if (best_at == 0xffffffffu || v > best) { best = v; best_at = at; }
        }
    }
    y[i] = best;
    switches[i] = best_at;
}

@compute @workgroup_size(WG)
fn avg_pool2d_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= pp.planes * pp.oh * pp.ow) { return; }
    let ox = i % pp.ow;
    let oy = (i / pp.ow) % pp.oh;
    let plane = i / (pp.ow * pp.oh);
    var acc = 0.0;
    for (var ky = 0u; ky < pp.kh; ky = ky + 1u) {
        let iy = i32(oy * pp.stride_h + ky) - i32(pp.pad_h);
        if (iy < 0 || iy >= i32(pp.h)) { continue; }
        for (var kx = 0u; kx < pp.kw; kx = kx + 1u) {
            let ix = i32(ox * pp.stride_w + kx) - i32(pp.pad_w);
            if (ix < 0 || ix >= i32(pp.w)) { continue; }
            acc = acc + x[(plane * pp.h + u32(iy)) * pp.w + u32(ix)];
        }
    }
    y[i] = acc / f32(pp.kh * pp.kw);
}

// Backward passes gather (one invocation per input element, looping over the outputs whose window covers it),
// so overlapping windows need no atomics.
//   grad_y: [n, c, oh, ow] (binding 1), switches (binding 2, max only), grad_x: [n, c, h, w] (binding 3)
@group(0) @binding(1) var<storage, read> grad_y: array<f32>;
@group(0) @binding(2) var<storage, read> saved_switches: array<u32>;
@group(0) @binding(3) var<storage, read_write> grad_x: array<f32>;
// Average pooling's backward has no switches, so its gradient is the second binding.
@group(0) @binding(2) var<storage, read_write> avg_grad_x: array<f32>;

// Output rows (or columns) whose window covers input position `pos`: [first, last] (first > last: none).
fn covering(pos: u32, pad: u32, k: u32, stride: u32, count: u32) -> vec2<i32> {
    let hi = (i32(pos) + i32(pad)) / i32(stride);
    let lo_num = i32(pos) + i32(pad) - i32(k) + 1;
    var lo = 0;
    if (lo_num > 0) { lo = (lo_num + i32(stride) - 1) / i32(stride); }
    return vec2<i32>(lo, min(hi, i32(count) - 1));
}

@compute @workgroup_size(WG)
fn max_pool2d_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= pp.planes * pp.h * pp.w) { return; }
    let at = i % (pp.h * pp.w);
    let plane = i / (pp.h * pp.w);
    let ry = covering(at / pp.w, pp.pad_h, pp.kh, pp.stride_h, pp.oh);
    let rx = covering(at % pp.w, pp.pad_w, pp.kw, pp.stride_w, pp.ow);
    var acc = 0.0;
    for (var oy = ry.x; oy <= ry.y; oy = oy + 1) {
        for (var ox = rx.x; ox <= rx.y; ox = ox + 1) {
            let o = (plane * pp.oh + u32(oy)) * pp.ow + u32(ox);
            if (saved_switches[o] == at) { acc = acc + grad_y[o]; }
        }
    }
    grad_x[i] = acc;
}

@compute @workgroup_size(WG)
fn avg_pool2d_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= pp.planes * pp.h * pp.w) { return; }
    let at = i % (pp.h * pp.w);
    let plane = i / (pp.h * pp.w);
    let ry = covering(at / pp.w, pp.pad_h, pp.kh, pp.stride_h, pp.oh);
    let rx = covering(at % pp.w, pp.pad_w, pp.kw, pp.stride_w, pp.ow);
    var acc = 0.0;
    for (var oy = ry.x; oy <= ry.y; oy = oy + 1) {
        for (var ox = rx.x; ox <= rx.y; ox = ox + 1) {
            acc = acc + grad_y[(plane * pp.oh + u32(oy)) * pp.ow + u32(ox)];
        }
    }
    avg_grad_x[i] = acc / f32(pp.kh * pp.kw);
}

// The gradient of max_pool2d_backward with respect to its grad_y (for second derivatives): each output
// position takes the value at its switch; linear, and the adjoint of max_pool2d_backward.
//   src: [n, c, h, w] (binding 1, as grad_y), switches (binding 2), out: [n, c, oh, ow] (binding 3, as grad_x)
@compute @workgroup_size(WG)
fn max_pool2d_gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = linear_id(gid, nwg);
    if (o >= pp.planes * pp.oh * pp.ow) { return; }
    let plane = o / (pp.oh * pp.ow);
    grad_x[o] = grad_y[plane * pp.h * pp.w + saved_switches[o]];
}
