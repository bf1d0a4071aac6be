// Ceiling kernels for `kiln bench`: the adapter's compute roof (an FMA chain with no memory traffic) and its
// memory roof (a large vec4 copy). Measured on the spot so every figure can be shown as a fraction of them.

struct RoofParams { n: u32, iters: u32, mul: f32, add: f32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: RoofParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

// out: [n] vec4. 16 independent vec4 FMA chains per invocation, the body twice per iteration: 16 * 4 * 2 * 2
// FLOPs per iteration, so loop upkeep is a sliver of the issue slots (a big GPU reaches its FMA rate only with
// next to nothing else issued; lavapipe fills its vectors only with this many independent chains).
@compute @workgroup_size(WG)
fn fma_roof(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.n) { return; }
    let m = vec4<f32>(p.mul);
    let c = vec4<f32>(p.add);
    let s = f32(gid.x) * 1e-7;
    var x0 = vec4<f32>(s); var x1 = vec4<f32>(s + 0.1); var x2 = vec4<f32>(s + 0.2); var x3 = vec4<f32>(s + 0.3);
    var x4 = vec4<f32>(s + 0.4); var x5 = vec4<f32>(s + 0.5); var x6 = vec4<f32>(s + 0.6); var x7 = vec4<f32>(s + 0.7);
    var y0 = vec4<f32>(s - 0.1); var y1 = vec4<f32>(s - 0.2); var y2 = vec4<f32>(s - 0.3); var y3 = vec4<f32>(s - 0.4);
    var y4 = vec4<f32>(s - 0.5); var y5 = vec4<f32>(s - 0.6); var y6 = vec4<f32>(s - 0.7); var y7 = vec4<f32>(s - 0.8);
    for (var i = 0u; i < p.iters; i = i + 1u) {
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c); x3 = fma(x3, m, c);
        x4 = fma(x4, m, c); x5 = fma(x5, m, c); x6 = fma(x6, m, c); x7 = fma(x7, m, c);
        y0 = fma(y0, m, c); y1 = fma(y1, m, c); y2 = fma(y2, m, c); y3 = fma(y3, m, c);
        y4 = fma(y4, m, c); y5 = fma(y5, m, c); y6 = fma(y6, m, c); y7 = fma(y7, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c); x3 = fma(x3, m, c);
        x4 = fma(x4, m, c); x5 = fma(x5, m, c); x6 = fma(x6, m, c); x7 = fma(x7, m, c);
        y0 = fma(y0, m, c); y1 = fma(y1, m, c); y2 = fma(y2, m, c); y3 = fma(y3, m, c);
        y4 = fma(y4, m, c); y5 = fma(y5, m, c); y6 = fma(y6, m, c); y7 = fma(y7, m, c);
    }
    dst[gid.x] = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + y0 + y1 + y2 + y3 + y4 + y5 + y6 + y7;
}

// dst[i] = src[i], i < n (vec4 elements): reads and writes n * 16 bytes each.
@compute @workgroup_size(WG)
fn copy_roof(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * WG;
    if (i >= p.n) { return; }
    dst[i] = src[i];
}

