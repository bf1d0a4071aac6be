// Batched matrix product C = op(A) @ op(B), register-blocked: each invocation computes a 4x4 block of C in
// registers and reads A and B straight from storage (no workgroup memory: 3-4x faster on lavapipe, see
// ../shared/notes). TRANS_A / TRANS_B read the operands transposed in place, so the backward products
// dA = dC @ B^T and dB = A^T @ dC need no transpose kernel.
//   A: [batch, M, K] ([batch, K, M] if TRANS_A)   B: [batch, K, N] ([batch, N, K] if TRANS_B)   C: [batch, M, N]
// A batch stride of 0 broadcasts that operand over the batch (a weight shared by every sample).

struct MatmulParams { m: u32, n: u32, k: u32, a_batch_stride: u32, b_batch_stride: u32, _pad0: u32, _pad1: u32, _pad2: u32 }

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

fn a_at(base: u32, row: u32, kk: u32) -> f32 {
    if (TRANS_A) { return a[base + kk * p.m + row]; }
    return a[base + row * p.k + kk];
}

fn b_at(base: u32, kk: u32, col: u32) -> f32 {
    if (TRANS_B) { return b[base + col * p.k + kk]; }
    return b[base + kk * p.n + col];
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= p.m || col0 >= p.n) { return; }
    let a_base = gid.z * p.a_batch_stride;
    let b_base = gid.z * p.b_batch_stride;
    // Rows/cols past the edge are clamped to the last valid one: loads stay branch-free, stores are masked.
    let r = vec4<u32>(min(row0, p.m - 1u), min(row0 + 1u, p.m - 1u), min(row0 + 2u, p.m - 1u), min(row0 + 3u, p.m - 1u));
    let cc = vec4<u32>(min(col0, p.n - 1u), min(col0 + 1u, p.n - 1u), min(col0 + 2u, p.n - 1u), min(col0 + 3u, p.n - 1u));
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk = kk + 1u) {
        let bv = vec4<f32>(b_at(b_base, kk, cc.x), b_at(b_base, kk, cc.y), b_at(b_base, kk, cc.z), b_at(b_base, kk, cc.w));
        acc0 = fma(vec4<f32>(a_at(a_base, r.x, kk)), bv, acc0);
        acc1 = fma(vec4<f32>(a_at(a_base, r.y, kk)), bv, acc1);
        acc2 = fma(vec4<f32>(a_at(a_base, r.z, kk)), bv, acc2);
        acc3 = fma(vec4<f32>(a_at(a_base, r.w, kk)), bv, acc3);
    }
    let c_base = gid.z * p.m * p.n;
    let rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = row0 + i;
        if (row >= p.m) { break; }
        for (var j = 0u; j < 4u; j = j + 1u) {
            if (col0 + j < p.n) { c[c_base + row * p.n + col0 + j] = rows[i][j]; }
        }
    }
}
