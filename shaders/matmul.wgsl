// Batched matrix product C = op(A) @ op(B) in five variants; the autotuner (kiln-graph/src/tune.rs) picks one
// per adapter and shape class, after checking it against the CPU reference:
//   matmul_naive      one output per invocation (the baseline the others are measured against)
//   matmul            register-blocked: a 4x4 block of C per invocation, scalar loads
//   matmul_vec4       the same block with 16-byte loads (contiguous axes a multiple of 4)
//   matmul_tiled      64x64 tiles staged in workgroup memory, 4x4 per invocation (what real GPUs reward)
//   matmul_subgroup   (matmul_subgroup.wgsl) 8-lane groups share A through subgroup shuffles, RB x 4 outputs
//                     per lane (what lavapipe rewards: there every storage load costs a per-lane loop, so
//                     loads per FMA decide speed)
// TRANS_A / TRANS_B read the operands transposed in place, so the backward products dA = dC @ B^T and
// dB = A^T @ dC need no transpose kernel.
// Params, bindings and a_at / b_at: matmul_common.wgsl, compiled in front of this file.

override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

// Writes a 4x4 block of C at (row0, col0), skipping what lies past the edges.
fn store_block(c_base: u32, row0: u32, col0: u32, rows: array<vec4<f32>, 4>) {
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = row0 + i;
        if (row >= p.m) { break; }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let at = c_base + row * p.n + col0 + j;
            if (col0 + j < p.n) { c[at] = rows[i][j] + select(0.0, c[at], p.accumulate != 0u); }
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
    for (var kk = p.k_begin; kk < p.k_end; kk = kk + 1u) {
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
        for (var kk = p.k_begin; kk < p.k_end; kk = kk + 4u) {
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
        for (var kk = p.k_begin; kk < p.k_end; kk = kk + 4u) {
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
        for (var kk = p.k_begin; kk < p.k_end; kk = kk + 1u) {
            let av = a4[(ab + kk * p.m + row0) / 4u];
            let bv = b4[(bb + kk * p.n + col0) / 4u];
            acc0 = fma(vec4<f32>(av.x), bv, acc0);
            acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2);
            acc3 = fma(vec4<f32>(av.w), bv, acc3);
        }
    } else {
        // A stored [k, m], B stored [n, k]
        for (var kk = p.k_begin; kk < p.k_end; kk = kk + 4u) {
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


// ---- matmul_naive: C[row, col] = sum_k A[row, k] B[k, col], one output per invocation ------------------------
@compute @workgroup_size(WG_X, WG_Y, 1)
fn matmul_naive(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.y;
    let col = gid.x;
    if (row >= p.m || col >= p.n) { return; }
    let a_base = gid.z * p.a_batch_stride;
    let b_base = gid.z * p.b_batch_stride;
    var acc = 0.0;
    for (var kk = p.k_begin; kk < p.k_end; kk = kk + 1u) {
        acc = fma(a_at(a_base, row, kk), b_at(b_base, kk, col), acc);
    }
    let at = gid.z * p.m * p.n + row * p.n + col;
    c[at] = acc + select(0.0, c[at], p.accumulate != 0u);
}

// ---- matmul_tiled: a 16x16 workgroup computes a 64x64 tile of C, 4x4 per invocation; each step stages a
// 64x16 slice of op(A) and a 16x64 slice of op(B) in workgroup memory (zero past the edges) --------------
const TILE: u32 = 64u;
const TILE_K: u32 = 16u;
var<workgroup> a_tile: array<f32, 1024>; // [TILE_K][TILE]: a_tile[kk * TILE + row]
var<workgroup> b_tile: array<f32, 1024>; // [TILE_K][TILE]: b_tile[kk * TILE + col]

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tile_row = wid.y * TILE;
    let tile_col = wid.x * TILE;
    let a_base = wid.z * p.a_batch_stride;
    let b_base = wid.z * p.b_batch_stride;
    let t = lid.y * 16u + lid.x; // 0..255: each invocation stages 4 elements of each slice
    var acc: array<vec4<f32>, 4>;
    for (var k0 = p.k_begin; k0 < p.k_end; k0 = k0 + TILE_K) {
        for (var e = 0u; e < 4u; e = e + 1u) {
            let slot = t + e * 256u;        // 0..1023
            let kk = slot / TILE;           // 0..15
            let rc = slot % TILE;           // row (of A) or col (of B) inside the tile
            let k = k0 + kk;
            let row = tile_row + rc;
            let col = tile_col + rc;
            var av = 0.0;
            var bv = 0.0;
            if (k < p.k_end && row < p.m) { av = a_at(a_base, row, k); }
            if (k < p.k_end && col < p.n) { bv = b_at(b_base, k, col); }
            a_tile[slot] = av;
            b_tile[slot] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk = kk + 1u) {
            let bv = vec4<f32>(b_tile[kk * TILE + lid.x * 4u], b_tile[kk * TILE + lid.x * 4u + 1u],
                               b_tile[kk * TILE + lid.x * 4u + 2u], b_tile[kk * TILE + lid.x * 4u + 3u]);
            for (var i = 0u; i < 4u; i = i + 1u) {
                acc[i] = fma(vec4<f32>(a_tile[kk * TILE + lid.y * 4u + i]), bv, acc[i]);
            }
        }
        workgroupBarrier();
    }
    let row0 = tile_row + lid.y * 4u;
    let col0 = tile_col + lid.x * 4u;
    if (row0 < p.m && col0 < p.n) {
        store_block(wid.z * p.m * p.n, row0, col0, acc);
    }
}
