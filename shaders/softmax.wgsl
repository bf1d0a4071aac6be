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
