// Batch normalisation in training mode, fused: x viewed as [n, c, inner] (inner = h * w, or 1 after a dense
// layer) is normalised per channel over its n * inner values. Forward and backward in pairs, each a per-channel
// reduction (one workgroup per channel) followed by one elementwise kernel, instead of the ~20 broadcast and
// reduce dispatches of the composite formula:
//   bn_stats            stats[3, c] = (mean, 1 / sqrt(var + eps), var)             x: [n, c, inner]
//   bn_apply            y = act((x - mean) * inv_std * gamma + beta)              y: [n, c, inner]
//   bn_backward_reduce  g_beta[c] = sum g_pre, g_gamma[c] = sum g_pre * xhat        g_pre = g * act'(y)
//   bn_backward_apply   dx = gamma * inv_std * (g_pre - (g_beta + xhat * g_gamma) / count)
//   bn_running_update   running = (1 - momentum) * running + momentum * batch statistic (variance unbiased)
// The variance is taken around the mean in a second pass over the channel (no cancellation of sum x^2 - mean^2).
// A lane walks its share of a channel as (sample, position) pairs, so no division runs per element; the
// launcher keeps n * inner per channel small enough for lavapipe's 65535-iteration loop cap.
// ACT: 0 identity, 1 relu, 2 sigmoid, 3 tanh (activation.wgsl, compiled in front of this file).

struct NormParams { n: u32, c: u32, inner: u32, lanes_inner: u32, eps: f32, momentum: f32, total: u32, _pad: u32 }

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> np: NormParams;

// ---- bn_stats: one workgroup per channel ------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> st_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> st_out: array<f32>;

var<workgroup> partial: array<f32, 256>;
var<workgroup> partial2: array<f32, 256>;

// Sum over the workgroup of each lane's (a, b); every lane gets the totals.
fn workgroup_sum2(lid: u32, a: f32, b: f32) -> vec2<f32> {
    partial[lid] = a;
    partial2[lid] = b;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
            partial2[lid] = partial2[lid] + partial2[lid + stride];
        }
        workgroupBarrier();
    }
    let total = vec2<f32>(partial[0], partial2[0]);
    workgroupBarrier();
    return total;
}

// Lane `lid` of channel `ch` visits samples tn, tn + lanes_n, ... and positions ti, ti + lanes_inner, ...
// (lanes_inner is a power of two dividing WG).
fn lane_start(lid: u32) -> vec2<u32> {
    return vec2<u32>(lid / np.lanes_inner, lid % np.lanes_inner);
}

@compute @workgroup_size(WG)
fn bn_stats(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let ch = wid.x;
    let start = lane_start(lid);
    let lanes_n = WG / np.lanes_inner;
    let count = f32(np.n * np.inner);
    var s = 0.0;
    for (var n = start.x; n < np.n; n = n + lanes_n) {
        let base = (n * np.c + ch) * np.inner;
        for (var i = start.y; i < np.inner; i = i + np.lanes_inner) { s = s + st_x[base + i]; }
    }
    let mean = workgroup_sum2(lid, s, 0.0).x / count;
    var q = 0.0;
    for (var n = start.x; n < np.n; n = n + lanes_n) {
        let base = (n * np.c + ch) * np.inner;
        for (var i = start.y; i < np.inner; i = i + np.lanes_inner) {
            let d = st_x[base + i] - mean;
            q = fma(d, d, q);
        }
    }
    let var_ = workgroup_sum2(lid, q, 0.0).x / count;
    if (lid == 0u) {
        st_out[ch] = mean;
        st_out[np.c + ch] = inverseSqrt(var_ + np.eps);
        st_out[2u * np.c + ch] = var_;
    }
}

// ---- bn_apply: y = act((x - mean) * inv_std * gamma + beta), one invocation per element ------------------
@group(0) @binding(1) var<storage, read> ap_x: array<f32>;
@group(0) @binding(2) var<storage, read> ap_stats: array<f32>;
@group(0) @binding(3) var<storage, read> ap_gamma: array<f32>;
@group(0) @binding(4) var<storage, read> ap_beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> ap_y: array<f32>;

@compute @workgroup_size(WG)
fn bn_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= np.total) { return; }
    let ch = (i / np.inner) % np.c;
    let scale = ap_stats[np.c + ch] * ap_gamma[ch];
    ap_y[i] = activate(fma(ap_x[i] - ap_stats[ch], scale, ap_beta[ch]));
}

// ---- bn_backward_reduce: one workgroup per channel ----------------------------------------------------------
// inputs g, y (the forward output, for act'), x, stats; outputs g_beta [c], g_gamma [c]
@group(0) @binding(1) var<storage, read> br_g: array<f32>;
@group(0) @binding(2) var<storage, read> br_y: array<f32>;
@group(0) @binding(3) var<storage, read> br_x: array<f32>;
@group(0) @binding(4) var<storage, read> br_stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> br_g_beta: array<f32>;
@group(0) @binding(6) var<storage, read_write> br_g_gamma: array<f32>;

@compute @workgroup_size(WG)
fn bn_backward_reduce(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let ch = wid.x;
    let start = lane_start(lid);
    let lanes_n = WG / np.lanes_inner;
    let mean = br_stats[ch];
    let inv_std = br_stats[np.c + ch];
    var sg = 0.0;
    var sgx = 0.0;
    for (var n = start.x; n < np.n; n = n + lanes_n) {
        let base = (n * np.c + ch) * np.inner;
        for (var i = start.y; i < np.inner; i = i + np.lanes_inner) {
            let g = br_g[base + i] * activation_slope(br_y[base + i]);
            sg = sg + g;
            sgx = fma(g, (br_x[base + i] - mean) * inv_std, sgx);
        }
    }
    let sums = workgroup_sum2(lid, sg, sgx);
    if (lid == 0u) {
        br_g_beta[ch] = sums.x;
        br_g_gamma[ch] = sums.y;
    }
}

// ---- bn_backward_apply: dx, one invocation per element --------------------------------------------------------
// inputs g, y, x, stats, gamma, g_beta, g_gamma; output dx
@group(0) @binding(1) var<storage, read> ba_g: array<f32>;
@group(0) @binding(2) var<storage, read> ba_y: array<f32>;
@group(0) @binding(3) var<storage, read> ba_x: array<f32>;
@group(0) @binding(4) var<storage, read> ba_stats: array<f32>;
@group(0) @binding(5) var<storage, read> ba_gamma: array<f32>;
@group(0) @binding(6) var<storage, read> ba_g_beta: array<f32>;
@group(0) @binding(7) var<storage, read> ba_g_gamma: array<f32>;
@group(0) @binding(8) var<storage, read_write> ba_dx: array<f32>;

@compute @workgroup_size(WG)
fn bn_backward_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= np.total) { return; }
    let ch = (i / np.inner) % np.c;
    let inv_std = ba_stats[np.c + ch];
    let xhat = (ba_x[i] - ba_stats[ch]) * inv_std;
    let g = ba_g[i] * activation_slope(ba_y[i]);
    let count = f32(np.n * np.inner);
    ba_dx[i] = ba_gamma[ch] * inv_std * (g - (ba_g_beta[ch] + xhat * ba_g_gamma[ch]) / count);
}

// ---- bn_running_update: one invocation per channel, in place ------------------------------------------------
@group(0) @binding(1) var<storage, read> ru_stats: array<f32>;
@group(0) @binding(2) var<storage, read_write> ru_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> ru_var: array<f32>;

@compute @workgroup_size(WG)
fn bn_running_update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    if (ch >= np.c) { return; }
    let count = f32(np.n * np.inner);
    let unbiased = ru_stats[2u * np.c + ch] * count / max(count - 1.0, 1.0);
    ru_mean[ch] = mix(ru_mean[ch], ru_stats[ch], np.momentum);
    ru_var[ch] = mix(ru_var[ch], unbiased, np.momentum);
}

// ---- Layer normalisation over the last axis, fused (PyTorch's nn.LayerNorm: biased variance): x viewed as
// [rows, d], one invocation per row (the row's loops run d times; d stays far under the loop cap).
//   ln_forward   y = (x - mean) * rstd * w + b, stats[rows, 2] = (mean, rstd)        x: [rows, d]
//   ln_backward  dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w;
//                gxhat = g * xhat (summed over rows afterwards for w's gradient)     g: [rows, d]
// The variance is taken around the mean in a second pass (no cancellation of sum x^2 - mean^2).
struct LnParams { rows: u32, d: u32, eps: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> lp: LnParams;
@group(0) @binding(1) var<storage, read> lf_x: array<f32>;
@group(0) @binding(2) var<storage, read> lf_w: array<f32>;
@group(0) @binding(3) var<storage, read> lf_b: array<f32>;
@group(0) @binding(4) var<storage, read_write> lf_y: array<f32>;
@group(0) @binding(5) var<storage, read_write> lf_stats: array<f32>;

@compute @workgroup_size(64)
fn ln_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= lp.rows) { return; }
    let base = r * lp.d;
    var sum = 0.0;
    for (var j = 0u; j < lp.d; j = j + 1u) { sum = sum + lf_x[base + j]; }
    let mean = sum / f32(lp.d);
    var sq = 0.0;
    for (var j = 0u; j < lp.d; j = j + 1u) {
        let c = lf_x[base + j] - mean;
        sq = sq + c * c;
    }
    let rstd = inverseSqrt(sq / f32(lp.d) + lp.eps);
    for (var j = 0u; j < lp.d; j = j + 1u) {
        lf_y[base + j] = (lf_x[base + j] - mean) * rstd * lf_w[j] + lf_b[j];
    }
    lf_stats[2u * r] = mean;
    lf_stats[2u * r + 1u] = rstd;
}

@group(0) @binding(1) var<storage, read> lb_g: array<f32>;
@group(0) @binding(2) var<storage, read> lb_x: array<f32>;
@group(0) @binding(3) var<storage, read> lb_w: array<f32>;
@group(0) @binding(4) var<storage, read> lb_stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> lb_dx: array<f32>;
@group(0) @binding(6) var<storage, read_write> lb_gxhat: array<f32>;

@compute @workgroup_size(64)
fn ln_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= lp.rows) { return; }
    let base = r * lp.d;
    let mean = lb_stats[2u * r];
    let rstd = lb_stats[2u * r + 1u];
    var s1 = 0.0;
    var s2 = 0.0;
    for (var j = 0u; j < lp.d; j = j + 1u) {
        let xhat = (lb_x[base + j] - mean) * rstd;
        let gw = lb_g[base + j] * lb_w[j];
        s1 = s1 + gw;
        s2 = s2 + gw * xhat;
        lb_gxhat[base + j] = lb_g[base + j] * xhat;
    }
    let m1 = s1 / f32(lp.d);
    let m2 = s2 / f32(lp.d);
    for (var j = 0u; j < lp.d; j = j + 1u) {
        let xhat = (lb_x[base + j] - mean) * rstd;
        lb_dx[base + j] = rstd * (lb_g[base + j] * lb_w[j] - m1 - xhat * m2);
    }
}
