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

// Writes a 4x4 block of C at (row0, col0), skipping what lies past the edges.
fn store_block(c_base: u32, row0: u32, col0: u32, rows: array<vec4<f32>, 4>) {
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = row0 + i;
        if (row >= p.m) { break; }
        for (var j = 0u; j < 4u; j = j + 1u) {
            if (col0 + j < p.n) { c[c_base + row * p.n + col0 + j] = rows[i][j]; }
        }
    }
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
    store_block(gid.z * p.m * p.n, row0, col0, array<vec4<f32>, 4>(acc0, acc1, acc2, acc3));
}

// ---- matmul_vec4: the same product with 16-byte loads along the contiguous axis of each operand ----------
// Used when that axis is a multiple of 4 (A: k, or m if TRANS_A; B: n, or k if TRANS_B); otherwise the scalar
// `matmul` above runs. Bindings alias a and b as vec4 arrays (same buffers, different entry point).
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;

@compute @workgroup_size(WG_X, WG_Y, 1)
fn matmul_vec4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= p.m || col0 >= p.n) { return; }
    let ab = gid.z * p.a_batch_stride;
    let bb = gid.z * p.b_batch_stride;
    let r = vec4<u32>(min(row0, p.m - 1u), min(row0 + 1u, p.m - 1u), min(row0 + 2u, p.m - 1u), min(row0 + 3u, p.m - 1u));
    let cc = vec4<u32>(min(col0, p.n - 1u), min(col0 + 1u, p.n - 1u), min(col0 + 2u, p.n - 1u), min(col0 + 3u, p.n - 1u));
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    if (!TRANS_A && !TRANS_B) {
        // A rows along k, B rows along n: acc_i += sum_j a_i[j] * b_j
        for (var kk = 0u; kk < p.k; kk = kk + 4u) {
            let b0 = b4[(bb + kk * p.n + col0) / 4u];
            let b1 = b4[(bb + (kk + 1u) * p.n + col0) / 4u];
            let b2 = b4[(bb + (kk + 2u) * p.n + col0) / 4u];
            let b3 = b4[(bb + (kk + 3u) * p.n + col0) / 4u];
            let a0 = a4[(ab + r.x * p.k + kk) / 4u];
            let a1 = a4[(ab + r.y * p.k + kk) / 4u];
            let a2 = a4[(ab + r.z * p.k + kk) / 4u];
            let a3 = a4[(ab + r.w * p.k + kk) / 4u];
            acc0 = fma(vec4<f32>(a0.w), b3, fma(vec4<f32>(a0.z), b2, fma(vec4<f32>(a0.y), b1, fma(vec4<f32>(a0.x), b0, acc0))));
            acc1 = fma(vec4<f32>(a1.w), b3, fma(vec4<f32>(a1.z), b2, fma(vec4<f32>(a1.y), b1, fma(vec4<f32>(a1.x), b0, acc1))));
            acc2 = fma(vec4<f32>(a2.w), b3, fma(vec4<f32>(a2.z), b2, fma(vec4<f32>(a2.y), b1, fma(vec4<f32>(a2.x), b0, acc2))));
            acc3 = fma(vec4<f32>(a3.w), b3, fma(vec4<f32>(a3.z), b2, fma(vec4<f32>(a3.y), b1, fma(vec4<f32>(a3.x), b0, acc3))));
        }
    } else if (!TRANS_A && TRANS_B) {
        // A rows along k, B stored [n, k]: acc_i[c] += dot(a_i, b_c)
        for (var kk = 0u; kk < p.k; kk = kk + 4u) {
            let b0 = b4[(bb + cc.x * p.k + kk) / 4u];
            let b1 = b4[(bb + cc.y * p.k + kk) / 4u];
            let b2 = b4[(bb + cc.z * p.k + kk) / 4u];
            let b3 = b4[(bb + cc.w * p.k + kk) / 4u];
            let a0 = a4[(ab + r.x * p.k + kk) / 4u];
            let a1 = a4[(ab + r.y * p.k + kk) / 4u];
            let a2 = a4[(ab + r.z * p.k + kk) / 4u];
            let a3 = a4[(ab + r.w * p.k + kk) / 4u];
            acc0 = acc0 + vec4<f32>(dot(a0, b0), dot(a0, b1), dot(a0, b2), dot(a0, b3));
            acc1 = acc1 + vec4<f32>(dot(a1, b0), dot(a1, b1), dot(a1, b2), dot(a1, b3));
            acc2 = acc2 + vec4<f32>(dot(a2, b0), dot(a2, b1), dot(a2, b2), dot(a2, b3));
            acc3 = acc3 + vec4<f32>(dot(a3, b0), dot(a3, b1), dot(a3, b2), dot(a3, b3));
        }
    } else if (TRANS_A && !TRANS_B) {
        // A stored [k, m], B rows along n: an outer product per k
        for (var kk = 0u; kk < p.k; kk = kk + 1u) {
            let av = a4[(ab + kk * p.m + row0) / 4u];
            let bv = b4[(bb + kk * p.n + col0) / 4u];
            acc0 = fma(vec4<f32>(av.x), bv, acc0);
            acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2);
            acc3 = fma(vec4<f32>(av.w), bv, acc3);
        }
    } else {
        // A stored [k, m], B stored [n, k]
        for (var kk = 0u; kk < p.k; kk = kk + 4u) {
            let b0 = b4[(bb + cc.x * p.k + kk) / 4u];
            let b1 = b4[(bb + cc.y * p.k + kk) / 4u];
            let b2 = b4[(bb + cc.z * p.k + kk) / 4u];
            let b3 = b4[(bb + cc.w * p.k + kk) / 4u];
            let t0 = vec4<f32>(b0.x, b1.x, b2.x, b3.x);
            let t1 = vec4<f32>(b0.y, b1.y, b2.y, b3.y);
            let t2 = vec4<f32>(b0.z, b1.z, b2.z, b3.z);
            let t3 = vec4<f32>(b0.w, b1.w, b2.w, b3.w);
            let a0 = a4[(ab + kk * p.m + row0) / 4u];
            let a1 = a4[(ab + (kk + 1u) * p.m + row0) / 4u];
            let a2 = a4[(ab + (kk + 2u) * p.m + row0) / 4u];
            let a3 = a4[(ab + (kk + 3u) * p.m + row0) / 4u];
            acc0 = fma(vec4<f32>(a3.x), t3, fma(vec4<f32>(a2.x), t2, fma(vec4<f32>(a1.x), t1, fma(vec4<f32>(a0.x), t0, acc0))));
            acc1 = fma(vec4<f32>(a3.y), t3, fma(vec4<f32>(a2.y), t2, fma(vec4<f32>(a1.y), t1, fma(vec4<f32>(a0.y), t0, acc1))));
            acc2 = fma(vec4<f32>(a3.z), t3, fma(vec4<f32>(a2.z), t2, fma(vec4<f32>(a1.z), t1, fma(vec4<f32>(a0.z), t0, acc2))));
            acc3 = fma(vec4<f32>(a3.w), t3, fma(vec4<f32>(a2.w), t2, fma(vec4<f32>(a1.w), t1, fma(vec4<f32>(a0.w), t0, acc3))));
        }
    }
    store_block(gid.z * p.m * p.n, row0, col0, array<vec4<f32>, 4>(acc0, acc1, acc2, acc3));
}

