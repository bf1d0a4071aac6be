// Softmax and log-softmax over one axis of x viewed as [outer, axis, inner]; y has x's shape.
// Numerically stable: the row max is subtracted before exp. LOG selects log_softmax.
// The backward rules are compositions of elementwise ops and reductions (kiln-graph backprop.rs).

struct SoftmaxParams { outer: u32, axis: u32, inner: u32, _pad: u32 }

override LOG: bool = false;
override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> sp: SoftmaxParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn softmax_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= sp.outer * sp.inner) { return; }
    let base = (i / sp.inner) * sp.axis * sp.inner + i % sp.inner;
    var m = x[base];
    for (var a = 1u; a < sp.axis; a = a + 1u) { m = max(m, x[base + a * sp.inner]); }
    var s = 0.0;
    for (var a = 0u; a < sp.axis; a = a + 1u) { s = s + exp(x[base + a * sp.inner] - m); }
    if (LOG) {
        let lse = m + log(s);
        for (var a = 0u; a < sp.axis; a = a + 1u) { y[base + a * sp.inner] = x[base + a * sp.inner] - lse; }
    } else {
        let inv = 1.0 / s;
        for (var a = 0u; a < sp.axis; a = a + 1u) { y[base + a * sp.inner] = exp(x[base + a * sp.inner] - m) * inv; }
    }
}

// ---- Softmax cross-entropy from logits and class labels, fused: the loss's forward is one kernel plus the
// mean, its backward one kernel, instead of one-hot, log-softmax, multiply, sum and scale each way.
//   cross_entropy_forward   loss_rows[r] = lse[r] - x[r, label[r]],  lse[r] = log sum_j exp(x[r, j])     x: [rows, classes]
//   cross_entropy_backward  dx[r, j] = g * (exp(x[r, j] - lse[r]) - (j == label[r])) / rows
// A label outside [0, classes) is an error made loud: its row's loss and gradient are NaN (as one_hot's row),
// so the loss turns NaN and the training loop stops naming the step (and, with anomaly detection, the op).
struct CrossEntropyParams { rows: u32, classes: u32, _pad0: u32, _pad1: u32 }

@group(0) @binding(0) var<uniform> cp: CrossEntropyParams;
@group(0) @binding(1) var<storage, read> ce_x: array<f32>;
@group(0) @binding(2) var<storage, read> ce_labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> ce_loss_rows: array<f32>;
@group(0) @binding(4) var<storage, read_write> ce_lse: array<f32>;

@compute @workgroup_size(WG)
fn cross_entropy_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * WG;
    if (r >= cp.rows) { return; }
    let base = r * cp.classes;
    var m = ce_x[base];
    for (var j = 1u; j < cp.classes; j = j + 1u) { m = max(m, ce_x[base + j]); }
    var s = 0.0;
    for (var j = 0u; j < cp.classes; j = j + 1u) { s = s + exp(ce_x[base + j] - m); }
    let lse = m + log(s);
    ce_lse[r] = lse;
    let label = ce_labels[r];
    ce_loss_rows[r] = select(bitcast<f32>(0x7fc00000u), lse - ce_x[base + min(label, cp.classes - 1u)], label < cp.classes);
}

@group(0) @binding(1) var<storage, read> cb_g: array<f32>;
@group(0) @binding(2) var<storage, read> cb_x: array<f32>;
@group(0) @binding(3) var<storage, read> cb_labels: array<u32>;
@group(0) @binding(4) var<storage, read> cb_lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> cb_dx: array<f32>;

@compute @workgroup_size(WG)
fn cross_entropy_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= cp.rows * cp.classes) { return; }
    let r = i / cp.classes;
    let label = cb_labels[r];
    if (label >= cp.classes) {
        cb_dx[i] = bitcast<f32>(0x7fc00000u);
        return;
    }
    let is_label = select(0.0, 1.0, i - r * cp.classes == label);
    cb_dx[i] = cb_g[0] * (exp(cb_x[i] - cb_lse[r]) - is_label) / f32(cp.rows);
}

// ---- Target distributions for cross-entropy with an ignored label and label smoothing (PyTorch's
// ignore_index and label_smoothing):
//   ce_targets  q[r, j] = (1 - eps) * (j == label[r]) + eps / classes; a row whose label is `ignore` is all
//               zero (it adds nothing to the loss and is not counted: the mean divides by sum(q)); a label
//               outside [0, classes) that is not ignored makes its row NaN, as everywhere else.
struct TargetParams { rows: u32, classes: u32, ignore: u32, has_ignore: u32, eps: f32, _pad0: u32, _pad1: u32, _pad2: u32 }

@group(0) @binding(0) var<uniform> tp: TargetParams;
@group(0) @binding(1) var<storage, read> tg_labels: array<u32>;
@group(0) @binding(2) var<storage, read_write> tg_q: array<f32>;

@compute @workgroup_size(WG)
fn ce_targets(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= tp.rows * tp.classes) { return; }
    let r = i / tp.classes;
    let label = tg_labels[r];
    if (tp.has_ignore != 0u && label == tp.ignore) {
        tg_q[i] = 0.0;
        return;
    }
    if (label >= tp.classes) {
        tg_q[i] = bitcast<f32>(0x7fc00000u);
        return;
    }
    tg_q[i] = select(0.0, 1.0 - tp.eps, i - r * tp.classes == label) + tp.eps / f32(tp.classes);
}
