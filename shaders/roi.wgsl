// ---- RoI-Align (torchvision.ops.roi_align): each output bin the mean of bilinear samples on a regular grid.
//   roi_align_forward   y[k, c, py, px]                                 x: [n, c, h, w], rois: [k, 5]
//   roi_align_backward  dx[b, c, h, w] = sum over RoIs k of image b, samples s touching (h, w):
//                       g[k, c, py(s), px(s)] * weight(s, h, w) / count(k)   (a gather: no atomics, the same
//                       sum in the same order every run)
// A RoI is (batch index, x1, y1, x2, y2) in input-image coordinates, times spatial_scale. With `aligned` the
// box is shifted by half a pixel (pixel centres at +0.5) and may be smaller than a pixel; without, it is at
// least 1 x 1. Samples per bin: sampling_ratio each way, or (0) ceil(roi size / output size). A batch index
// outside [0, n) gives zeros. The backward dispatch covers RoIs [k_begin, k_end) and adds to dx from an
// earlier dispatch unless k_begin is 0, so CPU adapters can split a long RoI list (lavapipe's loop cap).
struct RoiParams {
    n: u32, c: u32, h: u32, w: u32,
    k: u32, ph: u32, pw: u32, sampling: u32,
    scale: f32, aligned: u32, k_begin: u32, k_end: u32,
    // The forward passes scan a band only, resuming from the earlier bands unless row_begin is 0 (CPU
    // adapters split a bin that spans a large map): RoI pooling the image rows [row_begin, row_end), RoI-Align
    // its bin's sample rows [row_begin, row_end) counted from the first one inside the map (sums added).
    row_begin: u32, row_end: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<uniform> rp: RoiParams;

struct RoiGeom {
    b: u32, valid: bool,
    y0: f32, x0: f32,
    // Bin sizes, the step between samples, and samples per bin, each way.
    bh: f32, bw: f32,
    sy: f32, sx: f32,
    gh: u32, gw: u32,
    count: f32,
}

fn roi_geom(rois_k: array<f32, 5>) -> RoiGeom {
    var g: RoiGeom;
    let off = select(0.0, 0.5, rp.aligned != 0u);
    g.x0 = rois_k[1] * rp.scale - off;
    g.y0 = rois_k[2] * rp.scale - off;
    var rw = rois_k[3] * rp.scale - off - g.x0;
    var rh = rois_k[4] * rp.scale - off - g.y0;
    if (rp.aligned == 0u) {
        rw = max(rw, 1.0);
        rh = max(rh, 1.0);
    }
    g.bh = rh / f32(rp.ph);
    g.bw = rw / f32(rp.pw);
    // A negative size (x2 < x1 with `aligned`) gives no samples: f32 -> u32 clamps at 0. Absurd boxes are
    // capped at 2^20 samples a bin each way, so sample indices stay within u32.
    g.gh = min(select(u32(ceil(rh / f32(rp.ph))), rp.sampling, rp.sampling > 0u), 1048576u);
    g.gw = min(select(u32(ceil(rw / f32(rp.pw))), rp.sampling, rp.sampling > 0u), 1048576u);
    g.sy = g.bh / f32(max(g.gh, 1u));
    g.sx = g.bw / f32(max(g.gw, 1u));
    g.count = max(f32(g.gh) * f32(g.gw), 1.0);
    let bf = rois_k[0];
    // Infinite or NaN corners (a diverged proposal) make an empty box: zeros, no work.
    var finite = true;
    for (var j = 1u; j < 5u; j = j + 1u) { finite = finite && abs(rois_k[j]) < 3.0e38; }
    g.valid = finite && bf >= 0.0 && bf < f32(rp.n);
    g.b = u32(max(bf, 0.0));
    return g;
}

// Sample `i` of an axis (bin i / per, sample i % per in it), computed as torchvision does:
// start + bin * bin_size + (sample + 0.5) * bin_size / per.
fn sample_at(i: u32, start: f32, bin: f32, per: u32) -> f32 {
    return start + f32(i / per) * bin + (f32(i % per) + 0.5) * bin / f32(per);
}

// The samples [lo, hi) of bin `b` (of `per` samples, `per` at most 2^20) whose coordinate lies in [-1, size]:
// the others read 0, so the forward loops over these only (a huge box costs no more than the image).
fn samples_inside(b: u32, start: f32, bin: f32, per: u32, size: u32) -> vec2<u32> {
    if (per == 0u) { return vec2<u32>(0u, 0u); }
    let first = start + f32(b) * bin;
    let step = bin / f32(per);
    if (step == 0.0) { return select(vec2<u32>(0u, 0u), vec2<u32>(0u, per), first >= -1.0 && first <= f32(size)); }
    let a = (-1.0 - first) / step - 0.5;
    let c = (f32(size) - first) / step - 0.5;
    let lo = u32(clamp(floor(min(a, c)) - 1.0, 0.0, f32(per)));
    let hi = u32(clamp(ceil(max(a, c)) + 2.0, 0.0, f32(per)));
    return vec2<u32>(lo, max(lo, hi));
}

// torchvision's bilinear_interpolate: the low and high rows and columns a sample reads, and its four weights
// (low-low, low-high, high-low, high-high); all weights 0 outside [-1, size].
struct Bilinear { yl: u32, yh: u32, xl: u32, xh: u32, w1: f32, w2: f32, w3: f32, w4: f32 }

fn bilinear(y_in: f32, x_in: f32) -> Bilinear {
    var r: Bilinear;
    r.w1 = 0.0; r.w2 = 0.0; r.w3 = 0.0; r.w4 = 0.0;
    r.yl = 0u; r.yh = 0u; r.xl = 0u; r.xh = 0u;
    let hf = f32(rp.h);
    let wf = f32(rp.w);
    if (y_in < -1.0 || y_in > hf || x_in < -1.0 || x_in > wf) { return r; }
    var y = max(y_in, 0.0);
    var x = max(x_in, 0.0);
    r.yl = u32(y);
    r.xl = u32(x);
    if (r.yl >= rp.h - 1u) { r.yl = rp.h - 1u; r.yh = r.yl; y = f32(r.yl); } else { r.yh = r.yl + 1u; }
    if (r.xl >= rp.w - 1u) { r.xl = rp.w - 1u; r.xh = r.xl; x = f32(r.xl); } else { r.xh = r.xl + 1u; }
    let ly = y - f32(r.yl);
    let lx = x - f32(r.xl);
    let hy = 1.0 - ly;
    let hx = 1.0 - lx;
    r.w1 = hy * hx; r.w2 = hy * lx; r.w3 = ly * hx; r.w4 = ly * lx;
    return r;
}

@group(0) @binding(1) var<storage, read> rf_x: array<f32>;
@group(0) @binding(2) var<storage, read> rf_rois: array<f32>;
@group(0) @binding(3) var<storage, read_write> rf_y: array<f32>;

fn rf_roi(k: u32) -> array<f32, 5> {
    return array<f32, 5>(rf_rois[5u * k], rf_rois[5u * k + 1u], rf_rois[5u * k + 2u], rf_rois[5u * k + 3u], rf_rois[5u * k + 4u]);
}

@compute @workgroup_size(256)
fn roi_align_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let total = rp.k * rp.c * rp.ph * rp.pw;
    if (i >= total) { return; }
    let px = i % rp.pw;
    let py = (i / rp.pw) % rp.ph;
    let ch = (i / (rp.pw * rp.ph)) % rp.c;
    let k = i / (rp.pw * rp.ph * rp.c);
    let g = roi_geom(rf_roi(k));
    if (!g.valid) { rf_y[i] = 0.0; return; }
    let base = (g.b * rp.c + ch) * rp.h * rp.w;
    var acc = 0.0;
    let ys = samples_inside(py, g.y0, g.bh, g.gh, rp.h);
    let xs = samples_inside(px, g.x0, g.bw, g.gw, rp.w);
    let y_end = min(ys.y, ys.x + min(rp.row_end, ys.y - ys.x));
    for (var iy = ys.x + min(rp.row_begin, ys.y - ys.x); iy < y_end; iy = iy + 1u) {
        let y = sample_at(py * g.gh + iy, g.y0, g.bh, g.gh);
        for (var ix = xs.x; ix < xs.y; ix = ix + 1u) {
            let x = sample_at(px * g.gw + ix, g.x0, g.bw, g.gw);
            let s = bilinear(y, x);
            acc = acc + s.w1 * rf_x[base + s.yl * rp.w + s.xl] + s.w2 * rf_x[base + s.yl * rp.w + s.xh]
                      + s.w3 * rf_x[base + s.yh * rp.w + s.xl] + s.w4 * rf_x[base + s.yh * rp.w + s.xh];
        }
    }
    if (rp.row_begin > 0u) { rf_y[i] = rf_y[i] + acc / g.count; } else { rf_y[i] = acc / g.count; }
}

@group(0) @binding(1) var<storage, read> rb_g: array<f32>;
@group(0) @binding(2) var<storage, read> rb_rois: array<f32>;
@group(0) @binding(3) var<storage, read_write> rb_dx: array<f32>;

fn rb_roi(k: u32) -> array<f32, 5> {
    return array<f32, 5>(rb_rois[5u * k], rb_rois[5u * k + 1u], rb_rois[5u * k + 2u], rb_rois[5u * k + 3u], rb_rois[5u * k + 4u]);
}

// The samples of one axis whose bilinear reads can touch pixel `p`: their raw coordinate lies in [p - 1, p + 1]
// (clamping moves [-1, 0) to row 0 and [size - 1, size] to the last row, both inside that range). One extra
// index each side covers rounding; the weights decide exactly.
fn sample_range(p: u32, start: f32, step: f32, n: u32) -> vec2<u32> {
    if (n == 0u) { return vec2<u32>(0u, 0u); }
    // A box of size 0 (`aligned`, fixed sampling) puts every sample at `start`.
    if (step == 0.0) { return select(vec2<u32>(0u, 0u), vec2<u32>(0u, n), abs(start - f32(p)) <= 1.0); }
    // A negative size (x2 < x1 with `aligned` and fixed sampling) walks backwards.
    let a = (f32(p) - 1.0 - start) / step - 0.5;
    let b = (f32(p) + 1.0 - start) / step - 0.5;
    let lo = u32(clamp(floor(min(a, b)) - 1.0, 0.0, f32(n)));
    let hi = u32(clamp(ceil(max(a, b)) + 2.0, 0.0, f32(n)));
    return vec2<u32>(lo, max(lo, hi));
}

// One axis of torchvision's bilinear weights: how much a sample at `v` reads pixel `p` of an axis of `size`
// (0 outside [-1, size]; the clamped last pixel takes the whole weight). The 2-D weight is the product of the
// two axes', which is what lets the backward sum rows and columns separately.
fn axis_weight(v_in: f32, p: u32, size: u32) -> f32 {
    if (v_in < -1.0 || v_in > f32(size)) { return 0.0; }
    var v = max(v_in, 0.0);
    var lo = u32(v);
    var hi = lo + 1u;
    if (lo >= size - 1u) { lo = size - 1u; hi = lo; v = f32(lo); }
    let l = v - f32(lo);
    return select(0.0, 1.0 - l, lo == p) + select(0.0, l, hi == p);
}

// Each invocation sums ROI_CB channels of one pixel, so the geometry and weights of every (RoI, sample) are
// worked out once for all of them.
const ROI_CB: u32 = 8u;

@compute @workgroup_size(256)
fn roi_align_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let blocks = (rp.c + ROI_CB - 1u) / ROI_CB;
    if (i >= rp.n * blocks * rp.h * rp.w) { return; }
    let xw = i % rp.w;
    let yh = (i / rp.w) % rp.h;
    let c0 = ((i / (rp.w * rp.h)) % blocks) * ROI_CB;
    let b = i / (rp.w * rp.h * blocks);
    let cn = min(ROI_CB, rp.c - c0);
    let plane = rp.h * rp.w;
    let out0 = (b * rp.c + c0) * plane + yh * rp.w + xw;
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    if (rp.k_begin != 0u) {
        for (var q = 0u; q < cn; q = q + 1u) { acc[q] = rb_dx[out0 + q * plane]; }
    }
    let bins = rp.ph * rp.pw;
    for (var k = rp.k_begin; k < rp.k_end; k = k + 1u) {
        // Other images' RoIs first, on the batch index alone (the same test as g.valid && g.b == b, NaN
        // included): most of the list in a batch, skipped before the geometry's divisions.
        let bf = rb_rois[5u * k];
        if (!(bf >= f32(b) && bf < f32(b + 1u))) { continue; }
        let g = roi_geom(rb_roi(k));
        if (!g.valid || g.b != b) { continue; }
        let ys = sample_range(yh, g.y0, g.sy, rp.ph * g.gh);
        let xs = sample_range(xw, g.x0, g.sx, rp.pw * g.gw);
        let gbase = (k * rp.c + c0) * bins;
        for (var iy = ys.x; iy < ys.y; iy = iy + 1u) {
            let wy = axis_weight(sample_at(iy, g.y0, g.bh, g.gh), yh, rp.h);
            if (wy == 0.0) { continue; }
            let grow = gbase + (iy / g.gh) * rp.pw;
            for (var ix = xs.x; ix < xs.y; ix = ix + 1u) {
                let wx = axis_weight(sample_at(ix, g.x0, g.bw, g.gw), xw, rp.w);
                if (wx == 0.0) { continue; }
                let wgt = (wy * wx) / g.count;
                let at = grow + ix / g.gw;
                for (var q = 0u; q < cn; q = q + 1u) { acc[q] = acc[q] + rb_g[at + q * bins] * wgt; }
            }
        }
    }
    for (var q = 0u; q < cn; q = q + 1u) { rb_dx[out0 + q * plane] = acc[q]; }
}

// ---- RoI pooling (torchvision.ops.roi_pool): each bin the max over its pixels, the argmax kept.
//   roi_pool_forward   y[k, c, ph, pw], argmax[k, c, ph, pw] (position in the plane; 0xffffffff for an empty bin)
//   roi_pool_backward  dx[b, c, h, w] = sum of g over the bins of image b's RoIs whose argmax is (h, w) (a gather)
//   roi_pool_gather    y[k, c, ph, pw] = src[b, c, argmax] (the backward's adjoint, for second derivatives)
// Box corners are rounded (half away from zero) after spatial_scale; a box is at least 1 x 1; bin ph covers
// rows [floor(ph * bh), ceil((ph + 1) * bh)) from the box's start, clamped to the image.
struct PoolBox { b: u32, valid: bool, y0: i32, x0: i32, bh: f32, bw: f32 }

fn round_away(v: f32) -> f32 {
    return sign(v) * floor(abs(v) + 0.5);
}

fn pool_box(r: array<f32, 5>) -> PoolBox {
    var p: PoolBox;
    p.x0 = i32(round_away(r[1] * rp.scale));
    p.y0 = i32(round_away(r[2] * rp.scale));
    let x1 = i32(round_away(r[3] * rp.scale));
    let y1 = i32(round_away(r[4] * rp.scale));
    p.bw = f32(max(x1 - p.x0 + 1, 1)) / f32(rp.pw);
    p.bh = f32(max(y1 - p.y0 + 1, 1)) / f32(rp.ph);
    p.valid = r[0] >= 0.0 && r[0] < f32(rp.n);
    p.b = u32(max(r[0], 0.0));
    return p;
}

// [start, end) of bin i along an axis of `size` pixels.
fn pool_bin(i: u32, start: i32, bin: f32, size: u32) -> vec2<i32> {
    let s = clamp(i32(floor(f32(i) * bin)) + start, 0, i32(size));
    let e = clamp(i32(ceil(f32(i + 1u) * bin)) + start, 0, i32(size));
    return vec2<i32>(s, e);
}

@group(0) @binding(1) var<storage, read> pf_x: array<f32>;
@group(0) @binding(2) var<storage, read> pf_rois: array<f32>;
@group(0) @binding(3) var<storage, read_write> pf_y: array<f32>;
@group(0) @binding(4) var<storage, read_write> pf_arg: array<u32>;

@compute @workgroup_size(256)
fn roi_pool_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= rp.k * rp.c * rp.ph * rp.pw) { return; }
    let px = i % rp.pw;
    let py = (i / rp.pw) % rp.ph;
    let ch = (i / (rp.pw * rp.ph)) % rp.c;
    let k = i / (rp.pw * rp.ph * rp.c);
    let p = pool_box(array<f32, 5>(pf_rois[5u * k], pf_rois[5u * k + 1u], pf_rois[5u * k + 2u], pf_rois[5u * k + 3u], pf_rois[5u * k + 4u]));
    let hs = pool_bin(py, p.y0, p.bh, rp.h);
    let ws = pool_bin(px, p.x0, p.bw, rp.w);
    var best = 0.0;
    var arg = 0xffffffffu;
    let full = p.valid && hs.y > hs.x && ws.y > ws.x;
    if (full) {
        best = -3.402823e38;
        // Rows scanned in increasing order, a strict > : the first maximum in row-major order, as in one pass.
        if (rp.row_begin > 0u) { best = pf_y[i]; arg = pf_arg[i]; }
        let base = (p.b * rp.c + ch) * rp.h * rp.w;
        for (var y = max(hs.x, i32(rp.row_begin)); y < min(hs.y, i32(rp.row_end)); y = y + 1) {
            for (var x = ws.x; x < ws.y; x = x + 1) {
                let at = u32(y) * rp.w + u32(x);
                let v = pf_x[base + at];
                if (v > best) { best = v; arg = at; }
            }
        }
    }
    if (full || rp.row_begin == 0u) {
        pf_y[i] = best;
        pf_arg[i] = arg;
    }
}

@group(0) @binding(1) var<storage, read> pb_g: array<f32>;
@group(0) @binding(2) var<storage, read> pb_rois: array<f32>;
@group(0) @binding(3) var<storage, read> pb_arg: array<u32>;
@group(0) @binding(4) var<storage, read_write> pb_dx: array<f32>;

// The bins of an axis that can hold pixel `p` (a superset; the argmax decides).
fn pool_bin_range(p: u32, start: i32, bin: f32, n: u32) -> vec2<u32> {
    let rel = f32(i32(p) - start);
    let lo = clamp(floor(rel / bin) - 1.0, 0.0, f32(n));
    let hi = clamp(ceil((rel + 1.0) / bin) + 1.0, 0.0, f32(n));
    return vec2<u32>(u32(lo), u32(max(lo, hi)));
}

@compute @workgroup_size(256)
fn roi_pool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= rp.n * rp.c * rp.h * rp.w) { return; }
    let xw = i % rp.w;
    let yh = (i / rp.w) % rp.h;
    let ch = (i / (rp.w * rp.h)) % rp.c;
    let b = i / (rp.w * rp.h * rp.c);
    let at = yh * rp.w + xw;
    var acc = select(pb_dx[i], 0.0, rp.k_begin == 0u);
    for (var k = rp.k_begin; k < rp.k_end; k = k + 1u) {
        let p = pool_box(array<f32, 5>(pb_rois[5u * k], pb_rois[5u * k + 1u], pb_rois[5u * k + 2u], pb_rois[5u * k + 3u], pb_rois[5u * k + 4u]));
        if (!p.valid || p.b != b) { continue; }
        let ys = pool_bin_range(yh, p.y0, p.bh, rp.ph);
        let xs = pool_bin_range(xw, p.x0, p.bw, rp.pw);
        let base = (k * rp.c + ch) * rp.ph * rp.pw;
        for (var py = ys.x; py < ys.y; py = py + 1u) {
            for (var px = xs.x; px < xs.y; px = px + 1u) {
                if (pb_arg[base + py * rp.pw + px] == at) { acc = acc + pb_g[base + py * rp.pw + px]; }
            }
        }
    }
    pb_dx[i] = acc;
}

@group(0) @binding(1) var<storage, read> pg_src: array<f32>;
@group(0) @binding(2) var<storage, read> pg_rois: array<f32>;
@group(0) @binding(3) var<storage, read> pg_arg: array<u32>;
@group(0) @binding(4) var<storage, read_write> pg_y: array<f32>;

@compute @workgroup_size(256)
fn roi_pool_gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= rp.k * rp.c * rp.ph * rp.pw) { return; }
    let ch = (i / (rp.pw * rp.ph)) % rp.c;
    let k = i / (rp.pw * rp.ph * rp.c);
    let a = pg_arg[i];
    let bf = pg_rois[5u * k];
    if (a == 0xffffffffu || !(bf >= 0.0 && bf < f32(rp.n))) { pg_y[i] = 0.0; return; }
    pg_y[i] = pg_src[(u32(bf) * rp.c + ch) * rp.h * rp.w + a];
}
