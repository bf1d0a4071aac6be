// Reductions over one axis of x viewed as [outer, axis, inner] -> out: [outer, inner].
// OP 0 = sum (times `scale`, so mean is sum with scale 1/axis), OP 1 = max.

struct ReduceParams { outer: u32, axis: u32, inner: u32, scale: f32 }

override OP: u32 = 0u;
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn reduce_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= rp.outer * rp.inner) { return; }
    let o = i / rp.inner;
    let inner = i % rp.inner;
    let base = o * rp.axis * rp.inner + inner;
    if (OP == 1u) {
        var m = x[base];
        for (var a = 1u; a < rp.axis; a = a + 1u) { m = max(m, x[base + a * rp.inner]); }
        out[i] = m;
    } else {
        // Four partial sums: shorter dependency chains and a little less rounding error on long axes.
        var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0;
        var a = 0u;
        for (; a + 4u <= rp.axis; a = a + 4u) {
            s0 = s0 + x[base + a * rp.inner];
            s1 = s1 + x[base + (a + 1u) * rp.inner];
            s2 = s2 + x[base + (a + 2u) * rp.inner];
            s3 = s3 + x[base + (a + 3u) * rp.inner];
        }
        for (; a < rp.axis; a = a + 1u) { s0 = s0 + x[base + a * rp.inner]; }
        out[i] = ((s0 + s1) + (s2 + s3)) * rp.scale;
    }
}
