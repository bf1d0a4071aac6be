// Indexing: index_select along an axis (forward and backward) and one_hot.

// index_select_backward sums j in [j_begin, j_end) and adds to grad_x when `accumulate` is set: the launcher
// splits many indices over several dispatches (lavapipe ends an invocation's loops after 65535 iterations).
struct IndexParams { outer: u32, src_axis: u32, inner: u32, n_idx: u32, j_begin: u32, j_end: u32, accumulate: u32, _pad: u32 }

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> ip: IndexParams;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> picked: array<f32>;

// x: [outer, src_axis, inner], idx: [n_idx] -> out: [outer, n_idx, inner]; an index out of range reads NaN,
// so the error shows (PyTorch raises; a kernel cannot, and a silent 0 would train on).
@compute @workgroup_size(WG)
fn index_select_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= ip.outer * ip.n_idx * ip.inner) { return; }
    let inner = i % ip.inner;
    let j = (i / ip.inner) % ip.n_idx;
    let o = i / (ip.inner * ip.n_idx);
    let r = idx[j];
    picked[i] = select(bitcast<f32>(0x7fc00000u), table[(o * ip.src_axis + min(r, ip.src_axis - 1u)) * ip.inner + inner], r < ip.src_axis);
}

// grad_out: [outer, n_idx, inner], idx: [n_idx] -> grad_x: [outer, src_axis, inner].
// Each output sums the rows that picked it: no float atomics needed, repeated indices add up.
@group(0) @binding(1) var<storage, read> grad_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad_x: array<f32>;

@compute @workgroup_size(WG)
fn index_select_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= ip.outer * ip.src_axis * ip.inner) { return; }
    let inner = i % ip.inner;
    let r = (i / ip.inner) % ip.src_axis;
    let o = i / (ip.inner * ip.src_axis);
    var acc = select(0.0, grad_x[i], ip.accumulate != 0u);
    for (var j = ip.j_begin; j < ip.j_end; j = j + 1u) {
        if (idx[j] == r) { acc = acc + grad_out[(o * ip.n_idx + j) * ip.inner + inner]; }
    }
    grad_x[i] = acc;
}

// labels: [n] -> out: [n, classes] with 1.0 at the label, 0 elsewhere; a label out of range makes its row NaN.
struct OneHotParams { n: u32, classes: u32, _pad0: u32, _pad1: u32 }
@group(0) @binding(0) var<uniform> ohp: OneHotParams;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read_write> one_hot_out: array<f32>;

@compute @workgroup_size(WG)
fn one_hot(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= ohp.n * ohp.classes) { return; }
    let row = i / ohp.classes;
    let c = i % ohp.classes;
    one_hot_out[i] = select(select(0.0, 1.0, labels[row] == c), bitcast<f32>(0x7fc00000u), labels[row] >= ohp.classes);
}
