// Reductions over one axis of x viewed as [outer, axis, inner] -> out: [outer, pieces, inner], each piece
// covering `chunk` consecutive positions of the axis (pieces = 1 for a whole-axis reduction). The launcher
// reduces long axes in pieces, then the pieces: lavapipe stops any invocation's loops after 65535 iterations
// in all, so no invocation may loop over an unbounded axis.
// OP 0 = sum (times `scale`, so mean is sum with scale 1/axis), OP 1 = max.

struct ReduceParams { outer: u32, axis: u32, inner: u32, scale: f32, chunk: u32, pieces: u32, _pad0: u32, _pad1: u32 }

override OP: u32 = 0u;
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn reduce_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= rp.outer * rp.pieces * rp.inner) { return; }
    let o = i / (rp.pieces * rp.inner);
    let piece = (i / rp.inner) % rp.pieces;
    let inner = i % rp.inner;
    let base = o * rp.axis * rp.inner + inner;
    let a0 = piece * rp.chunk;
    let a1 = min(rp.axis, a0 + rp.chunk);
    if (OP == 1u) {
        var m = x[base + a0 * rp.inner];
        for (var a = a0 + 1u; a < a1; a = a + 1u) { m = max(m, x[base + a * rp.inner]); }
        out[i] = m;
    } else {
        // Four partial sums: shorter dependency chains and a little less rounding error on long axes.
        var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0;
        var a = a0;
        for (; a + 4u <= a1; a = a + 4u) {
            s0 = s0 + x[base + a * rp.inner];
            s1 = s1 + x[base + (a + 1u) * rp.inner];
            s2 = s2 + x[base + (a + 2u) * rp.inner];
            s3 = s3 + x[base + (a + 3u) * rp.inner];
        }
        for (; a < a1; a = a + 1u) { s0 = s0 + x[base + a * rp.inner]; }
        out[i] = ((s0 + s1) + (s2 + s3)) * rp.scale;
    }
}
