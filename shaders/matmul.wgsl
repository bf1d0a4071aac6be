// Batched matrix product C = op(A) @ op(B) in eight variants; the autotuner (kiln-graph/src/tune.rs) picks one
// per adapter and shape class, after checking it against the CPU reference:
//   matmul_naive      one output per invocation (the baseline the others are measured against)
//   matmul            register-blocked: a 4x4 block of C per invocation, scalar loads
//   matmul_vec4       the same block with 16-byte loads (contiguous axes a multiple of 4)
//   matmul_vec4x8     an 8x8 block per invocation from 16-byte loads (four times the FMAs per load of vec4)
//   matmul_tiled      64x64 tiles staged in workgroup memory, 4x4 per invocation
//   matmul_tiled128   128x128 tiles, 8x8 per invocation, the next slices prefetched into registers (what real
//                     GPUs reward: many FMAs per workgroup-memory load); _vec4 with 16-byte slice loads
//   matmul_tiled128_k16  the same with 16-deep slices (the fastest at 4096^3 on an H200)
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
            if (col0 + j < p.n) { c[at] = rows[i][j] + select(0.0, c[at], ACCUMULATE); }
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
    c[at] = acc + select(0.0, c[at], ACCUMULATE);
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

// ---- The 8x8 block of C that matmul_vec4x8 and matmul_tiled128 give each invocation, in private registers:
// c<i><l|h> is row i of the block (0-7), columns 0-3 (l) and 4-7 (h) of it. ----------------------------------
var<private> c0l: vec4<f32>; var<private> c0h: vec4<f32>; var<private> c1l: vec4<f32>; var<private> c1h: vec4<f32>;
var<private> c2l: vec4<f32>; var<private> c2h: vec4<f32>; var<private> c3l: vec4<f32>; var<private> c3h: vec4<f32>;
var<private> c4l: vec4<f32>; var<private> c4h: vec4<f32>; var<private> c5l: vec4<f32>; var<private> c5h: vec4<f32>;
var<private> c6l: vec4<f32>; var<private> c6h: vec4<f32>; var<private> c7l: vec4<f32>; var<private> c7h: vec4<f32>;

// One k step of the 8x8 block: column (a_lo: rows 0-3, a_hi: rows 4-7) times row (b_lo: cols 0-3, b_hi: 4-7).
fn outer8(a_lo: vec4<f32>, a_hi: vec4<f32>, b_lo: vec4<f32>, b_hi: vec4<f32>) {
    c0l = fma(vec4<f32>(a_lo.x), b_lo, c0l); c0h = fma(vec4<f32>(a_lo.x), b_hi, c0h);
    c1l = fma(vec4<f32>(a_lo.y), b_lo, c1l); c1h = fma(vec4<f32>(a_lo.y), b_hi, c1h);
    c2l = fma(vec4<f32>(a_lo.z), b_lo, c2l); c2h = fma(vec4<f32>(a_lo.z), b_hi, c2h);
    c3l = fma(vec4<f32>(a_lo.w), b_lo, c3l); c3h = fma(vec4<f32>(a_lo.w), b_hi, c3h);
    c4l = fma(vec4<f32>(a_hi.x), b_lo, c4l); c4h = fma(vec4<f32>(a_hi.x), b_hi, c4h);
    c5l = fma(vec4<f32>(a_hi.y), b_lo, c5l); c5h = fma(vec4<f32>(a_hi.y), b_hi, c5h);
    c6l = fma(vec4<f32>(a_hi.z), b_lo, c6l); c6h = fma(vec4<f32>(a_hi.z), b_hi, c6h);
    c7l = fma(vec4<f32>(a_hi.w), b_lo, c7l); c7h = fma(vec4<f32>(a_hi.w), b_hi, c7h);
}

// Writes the block as four 4x4 blocks: rows row0 and row0 + row_gap, columns col0 and col0 + col_gap.
fn store_block8(c_base: u32, row0: u32, col0: u32, row_gap: u32, col_gap: u32) {
    store_block(c_base, row0, col0, array<vec4<f32>, 4>(c0l, c1l, c2l, c3l));
    store_block(c_base, row0, col0 + col_gap, array<vec4<f32>, 4>(c0h, c1h, c2h, c3h));
    store_block(c_base, row0 + row_gap, col0, array<vec4<f32>, 4>(c4l, c5l, c6l, c7l));
    store_block(c_base, row0 + row_gap, col0 + col_gap, array<vec4<f32>, 4>(c4h, c5h, c6h, c7h));
}

// The 4 columns of a 4x4 block given as its 4 rows.
fn transpose4(r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(vec4<f32>(r0.x, r1.x, r2.x, r3.x), vec4<f32>(r0.y, r1.y, r2.y, r3.y),
                               vec4<f32>(r0.z, r1.z, r2.z, r3.z), vec4<f32>(r0.w, r1.w, r2.w, r3.w));
}

// ---- matmul_vec4x8: an 8x8 block of C per invocation from 16-byte loads, no workgroup memory: 256 FMAs per
// 16 loads (the 4x4 kernel does 64 per 8). Contiguous axes and k multiples of 4. ---------------------------
@compute @workgroup_size(WG_X, WG_Y, 1)
fn matmul_vec4x8(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 8u;
    let col0 = gid.x * 8u;
    if (row0 >= p.m || col0 >= p.n) { return; }
    let ab = gid.z * p.a_batch_stride;
    let bb = gid.z * p.b_batch_stride;
    // Rows and columns past the edge read the last valid ones (vec4 groups stay aligned: m, n multiples of 4
    // along the contiguous axes); the stores are masked.
    let rh = min(row0 + 4u, p.m - select(1u, 4u, TRANS_A));
    let ch = min(col0 + 4u, p.n - select(4u, 1u, TRANS_B));
    for (var kk = p.k_begin; kk < p.k_end; kk = kk + 4u) {
        var a_lo: array<vec4<f32>, 4>; // a_lo[q]: rows 0-3 at k = kk + q
        var a_hi: array<vec4<f32>, 4>; // rows 4-7
        if (TRANS_A) {
            a_lo = array<vec4<f32>, 4>(a4[(ab + kk * p.m + row0) / 4u], a4[(ab + (kk + 1u) * p.m + row0) / 4u],
                                       a4[(ab + (kk + 2u) * p.m + row0) / 4u], a4[(ab + (kk + 3u) * p.m + row0) / 4u]);
            a_hi = array<vec4<f32>, 4>(a4[(ab + kk * p.m + rh) / 4u], a4[(ab + (kk + 1u) * p.m + rh) / 4u],
                                       a4[(ab + (kk + 2u) * p.m + rh) / 4u], a4[(ab + (kk + 3u) * p.m + rh) / 4u]);
        } else {
            let last = p.m - 1u;
            a_lo = transpose4(a4[(ab + row0 * p.k + kk) / 4u], a4[(ab + min(row0 + 1u, last) * p.k + kk) / 4u],
                              a4[(ab + min(row0 + 2u, last) * p.k + kk) / 4u], a4[(ab + min(row0 + 3u, last) * p.k + kk) / 4u]);
            a_hi = transpose4(a4[(ab + rh * p.k + kk) / 4u], a4[(ab + min(rh + 1u, last) * p.k + kk) / 4u],
                              a4[(ab + min(rh + 2u, last) * p.k + kk) / 4u], a4[(ab + min(rh + 3u, last) * p.k + kk) / 4u]);
        }
        var b_lo: array<vec4<f32>, 4>; // b_lo[q]: cols 0-3 at k = kk + q
        var b_hi: array<vec4<f32>, 4>; // cols 4-7
        if (TRANS_B) {
            let last = p.n - 1u;
            b_lo = transpose4(b4[(bb + col0 * p.k + kk) / 4u], b4[(bb + min(col0 + 1u, last) * p.k + kk) / 4u],
                              b4[(bb + min(col0 + 2u, last) * p.k + kk) / 4u], b4[(bb + min(col0 + 3u, last) * p.k + kk) / 4u]);
            b_hi = transpose4(b4[(bb + ch * p.k + kk) / 4u], b4[(bb + min(ch + 1u, last) * p.k + kk) / 4u],
                              b4[(bb + min(ch + 2u, last) * p.k + kk) / 4u], b4[(bb + min(ch + 3u, last) * p.k + kk) / 4u]);
        } else {
            b_lo = array<vec4<f32>, 4>(b4[(bb + kk * p.n + col0) / 4u], b4[(bb + (kk + 1u) * p.n + col0) / 4u],
                                       b4[(bb + (kk + 2u) * p.n + col0) / 4u], b4[(bb + (kk + 3u) * p.n + col0) / 4u]);
            b_hi = array<vec4<f32>, 4>(b4[(bb + kk * p.n + ch) / 4u], b4[(bb + (kk + 1u) * p.n + ch) / 4u],
                                       b4[(bb + (kk + 2u) * p.n + ch) / 4u], b4[(bb + (kk + 3u) * p.n + ch) / 4u]);
        }
        outer8(a_lo[0], a_hi[0], b_lo[0], b_hi[0]);
        outer8(a_lo[1], a_hi[1], b_lo[1], b_hi[1]);
        outer8(a_lo[2], a_hi[2], b_lo[2], b_hi[2]);
        outer8(a_lo[3], a_hi[3], b_lo[3], b_hi[3]);
    }
    store_block8(gid.z * p.m * p.n, row0, col0, 4u, 4u);
}

// ---- matmul_tiled128: a 16x16 workgroup computes a 128x128 tile of C, 8x8 per invocation: two 4x4 blocks 64
// apart in each direction, so neighbouring lanes read neighbouring vec4s of workgroup memory. Each step stages
// a 128x8 slice of op(A) and an 8x128 slice of op(B) (zero past the edges), and the next slices are loaded into
// registers while the current ones are multiplied: 64 FMAs per 4 workgroup-memory loads, the shape real GPUs
// reward. ---------------------------------------------------------------------------------------------------
const SLAB_K: u32 = 8u;
// Two slabs of each operand (double buffering: the next slice is staged into one while the other is read, one
// barrier per slice): [2][SLAB_K][128 / 4], row r of op(A) in slab h at a_slab[h * 256 + kk * 32 + r / 4][r % 4].
var<workgroup> a_slab: array<vec4<f32>, 512>;
var<workgroup> b_slab: array<vec4<f32>, 512>;

// Invocation t stages 4 consecutive elements of each slice, walked in memory order so a subgroup's loads are
// contiguous: op(A)'s slice along k (A is [m, k]: row t / 2, k 4 (t % 2)..+3) or along m (A is [k, m]:
// k t / 32, rows 4 (t % 32)..+3); op(B)'s likewise.
fn a_slab_elem(a_base: u32, row: u32, k: u32) -> f32 {
    if (row < p.m && k < p.k_end) { return a_at(a_base, row, k); }
    return 0.0;
}

fn b_slab_elem(b_base: u32, k: u32, col: u32) -> f32 {
    if (col < p.n && k < p.k_end) { return b_at(b_base, k, col); }
    return 0.0;
}

// The 16-byte forms, for matmul_tiled128_vec4 (the launcher picks it when the contiguous axes, k and the
// batch strides are multiples of 4): each invocation's 4 elements are one aligned load, wholly inside the
// matrix or wholly outside.
fn load_a_slice4(a_base: u32, tile_row: u32, k0: u32, t: u32) -> vec4<f32> {
    let rk = select(vec2<u32>(t / 2u, (t % 2u) * 4u), vec2<u32>((t % 32u) * 4u, t / 32u), TRANS_A);
    let row = tile_row + rk.x;
    let k = k0 + rk.y;
    if (row >= p.m || k >= p.k_end) { return vec4<f32>(0.0); }
    if (TRANS_A) { return a4[(a_base + k * p.m + row) / 4u]; }
    return a4[(a_base + row * p.k + k) / 4u];
}

fn load_b_slice4(b_base: u32, tile_col: u32, k0: u32, t: u32) -> vec4<f32> {
    let ck = select(vec2<u32>((t % 32u) * 4u, t / 32u), vec2<u32>(t / 2u, (t % 2u) * 4u), TRANS_B);
    let col = tile_col + ck.x;
    let k = k0 + ck.y;
    if (col >= p.n || k >= p.k_end) { return vec4<f32>(0.0); }
    if (TRANS_B) { return b4[(b_base + col * p.k + k) / 4u]; }
    return b4[(b_base + k * p.n + col) / 4u];
}

fn load_a_slice(a_base: u32, tile_row: u32, k0: u32, t: u32) -> vec4<f32> {
    if (TRANS_A) {
        let row = tile_row + (t % 32u) * 4u;
        let k = k0 + t / 32u;
        return vec4<f32>(a_slab_elem(a_base, row, k), a_slab_elem(a_base, row + 1u, k), a_slab_elem(a_base, row + 2u, k), a_slab_elem(a_base, row + 3u, k));
    }
    let row = tile_row + t / 2u;
    let k = k0 + (t % 2u) * 4u;
    return vec4<f32>(a_slab_elem(a_base, row, k), a_slab_elem(a_base, row, k + 1u), a_slab_elem(a_base, row, k + 2u), a_slab_elem(a_base, row, k + 3u));
}

fn load_b_slice(b_base: u32, tile_col: u32, k0: u32, t: u32) -> vec4<f32> {
    if (TRANS_B) {
        let col = tile_col + t / 2u;
        let k = k0 + (t % 2u) * 4u;
        return vec4<f32>(b_slab_elem(b_base, k, col), b_slab_elem(b_base, k + 1u, col), b_slab_elem(b_base, k + 2u, col), b_slab_elem(b_base, k + 3u, col));
    }
    let col = tile_col + (t % 32u) * 4u;
    let k = k0 + t / 32u;
    return vec4<f32>(b_slab_elem(b_base, k, col), b_slab_elem(b_base, k, col + 1u), b_slab_elem(b_base, k, col + 2u), b_slab_elem(b_base, k, col + 3u));
}

// Puts what load_a_slice / load_b_slice gave invocation t into slab h: one vec4 store when the 4 elements are 4
// rows (columns) at one k, four scalar stores when they are 4 k of one row (column).
fn stage_slices(t: u32, av: vec4<f32>, bv: vec4<f32>, h: u32) {
    let o = h * 256u;
    if (TRANS_A) {
        a_slab[o + (t / 32u) * 32u + t % 32u] = av;
    } else {
        let row = t / 2u;
        let k = (t % 2u) * 4u;
        a_slab[o + k * 32u + row / 4u][row % 4u] = av.x;
        a_slab[o + (k + 1u) * 32u + row / 4u][row % 4u] = av.y;
        a_slab[o + (k + 2u) * 32u + row / 4u][row % 4u] = av.z;
        a_slab[o + (k + 3u) * 32u + row / 4u][row % 4u] = av.w;
    }
    if (TRANS_B) {
        let col = t / 2u;
        let k = (t % 2u) * 4u;
        b_slab[o + k * 32u + col / 4u][col % 4u] = bv.x;
        b_slab[o + (k + 1u) * 32u + col / 4u][col % 4u] = bv.y;
        b_slab[o + (k + 2u) * 32u + col / 4u][col % 4u] = bv.z;
        b_slab[o + (k + 3u) * 32u + col / 4u][col % 4u] = bv.w;
    } else {
        b_slab[o + (t / 32u) * 32u + t % 32u] = bv;
    }
}

// The 8x8 block's share of slab h.
fn multiply_slab(h: u32, lid: vec3<u32>) {
    let o = h * 256u;
    for (var kk = 0u; kk < SLAB_K; kk = kk + 1u) {
        let at = o + kk * 32u;
        outer8(a_slab[at + lid.y], a_slab[at + 16u + lid.y], b_slab[at + lid.x], b_slab[at + 16u + lid.x]);
    }
}

// The end of one slice of the double-buffered loop: multiply slab h while the next slice's loads (issued by the
// caller) are in flight, then stage them into the other slab, which every invocation finished reading before
// the previous barrier. Called in uniform control flow (it holds the barrier).
fn multiply_then_stage(h: u32, lid: vec3<u32>, t: u32, more: bool, next_a: vec4<f32>, next_b: vec4<f32>) {
    multiply_slab(h, lid);
    if (more) {
        stage_slices(t, next_a, next_b, 1u - h);
    }
    workgroupBarrier();
}

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled128(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tile_row = wid.y * 128u;
    let tile_col = wid.x * 128u;
    let a_base = wid.z * p.a_batch_stride;
    let b_base = wid.z * p.b_batch_stride;
    let t = lid.y * 16u + lid.x;
    stage_slices(t, load_a_slice(a_base, tile_row, p.k_begin, t), load_b_slice(b_base, tile_col, p.k_begin, t), 0u);
    workgroupBarrier();
    var h = 0u;
    for (var k0 = p.k_begin; k0 < p.k_end; k0 = k0 + SLAB_K) {
        let more = k0 + SLAB_K < p.k_end;
        var next_a = vec4<f32>(0.0);
        var next_b = vec4<f32>(0.0);
        if (more) {
            next_a = load_a_slice(a_base, tile_row, k0 + SLAB_K, t);
            next_b = load_b_slice(b_base, tile_col, k0 + SLAB_K, t);
        }
        multiply_then_stage(h, lid, t, more, next_a, next_b);
        h = 1u - h;
    }
    // The invocation's rows are tile_row + 4 ly + (0-3, 64-67), its columns tile_col + 4 lx + (0-3, 64-67).
    store_block8(wid.z * p.m * p.n, tile_row + lid.y * 4u, tile_col + lid.x * 4u, 64u, 64u);
}

// The same with 16-byte slab loads: a separate entry point, since one entry may not bind a buffer both as
// array<f32> (a, b) and as array<vec4<f32>> (a4, b4), and WGSL has no way to pass the loaders in.
@compute @workgroup_size(16, 16, 1)
fn matmul_tiled128_vec4(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tile_row = wid.y * 128u;
    let tile_col = wid.x * 128u;
    let a_base = wid.z * p.a_batch_stride;
    let b_base = wid.z * p.b_batch_stride;
    let t = lid.y * 16u + lid.x;
    stage_slices(t, load_a_slice4(a_base, tile_row, p.k_begin, t), load_b_slice4(b_base, tile_col, p.k_begin, t), 0u);
    workgroupBarrier();
    var h = 0u;
    for (var k0 = p.k_begin; k0 < p.k_end; k0 = k0 + SLAB_K) {
        let more = k0 + SLAB_K < p.k_end;
        var next_a = vec4<f32>(0.0);
        var next_b = vec4<f32>(0.0);
        if (more) {
            next_a = load_a_slice4(a_base, tile_row, k0 + SLAB_K, t);
            next_b = load_b_slice4(b_base, tile_col, k0 + SLAB_K, t);
        }
        multiply_then_stage(h, lid, t, more, next_a, next_b);
        h = 1u - h;
    }
    // The invocation's rows are tile_row + 4 ly + (0-3, 64-67), its columns tile_col + 4 lx + (0-3, 64-67).
    store_block8(wid.z * p.m * p.n, tile_row + lid.y * 4u, tile_col + lid.x * 4u, 64u, 64u);
}

// ---- matmul_tiled128_k16: matmul_tiled128_vec4 with 16-deep slices (16 KiB of workgroup memory): half the
// barriers per k, and each invocation has two 16-byte loads of each operand in flight per slice. Aligned
// shapes only (as matmul_tiled128_vec4). -----------------------------------------------------------------------
var<workgroup> a_slab16: array<vec4<f32>, 512>; // [16][128 / 4]
var<workgroup> b_slab16: array<vec4<f32>, 512>;

// Slot s (0..511) of a 16-deep slice as (row or col, k) within the tile: 4 slots per row along k when the
// operand's rows run along k, else 32 slots per k along the rows.
fn slot16(s: u32, along_k: bool) -> vec2<u32> {
    return select(vec2<u32>((s % 32u) * 4u, s / 32u), vec2<u32>(s / 4u, (s % 4u) * 4u), along_k);
}

fn load_a16(a_base: u32, tile_row: u32, k0: u32, s: u32) -> vec4<f32> {
    let rk = slot16(s, !TRANS_A);
    let row = tile_row + rk.x;
    let k = k0 + rk.y;
    if (row >= p.m || k >= p.k_end) { return vec4<f32>(0.0); }
    if (TRANS_A) { return a4[(a_base + k * p.m + row) / 4u]; }
    return a4[(a_base + row * p.k + k) / 4u];
}

fn load_b16(b_base: u32, tile_col: u32, k0: u32, s: u32) -> vec4<f32> {
    let ck = slot16(s, TRANS_B);
    let col = tile_col + ck.x;
    let k = k0 + ck.y;
    if (col >= p.n || k >= p.k_end) { return vec4<f32>(0.0); }
    if (TRANS_B) { return b4[(b_base + col * p.k + k) / 4u]; }
    return b4[(b_base + k * p.n + col) / 4u];
}

fn stage16(s: u32, av: vec4<f32>, bv: vec4<f32>) {
    let rk = slot16(s, !TRANS_A);
    if (TRANS_A) {
        a_slab16[rk.y * 32u + rk.x / 4u] = av;
    } else {
        a_slab16[rk.y * 32u + rk.x / 4u][rk.x % 4u] = av.x;
        a_slab16[(rk.y + 1u) * 32u + rk.x / 4u][rk.x % 4u] = av.y;
        a_slab16[(rk.y + 2u) * 32u + rk.x / 4u][rk.x % 4u] = av.z;
        a_slab16[(rk.y + 3u) * 32u + rk.x / 4u][rk.x % 4u] = av.w;
    }
    let ck = slot16(s, TRANS_B);
    if (TRANS_B) {
        b_slab16[ck.y * 32u + ck.x / 4u][ck.x % 4u] = bv.x;
        b_slab16[(ck.y + 1u) * 32u + ck.x / 4u][ck.x % 4u] = bv.y;
        b_slab16[(ck.y + 2u) * 32u + ck.x / 4u][ck.x % 4u] = bv.z;
        b_slab16[(ck.y + 3u) * 32u + ck.x / 4u][ck.x % 4u] = bv.w;
    } else {
        b_slab16[ck.y * 32u + ck.x / 4u] = bv;
    }
}

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled128_k16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tile_row = wid.y * 128u;
    let tile_col = wid.x * 128u;
    let a_base = wid.z * p.a_batch_stride;
    let b_base = wid.z * p.b_batch_stride;
    let t = lid.y * 16u + lid.x;
    var a0 = load_a16(a_base, tile_row, p.k_begin, t);
    var a1 = load_a16(a_base, tile_row, p.k_begin, t + 256u);
    var b0 = load_b16(b_base, tile_col, p.k_begin, t);
    var b1 = load_b16(b_base, tile_col, p.k_begin, t + 256u);
    for (var k0 = p.k_begin; k0 < p.k_end; k0 = k0 + 16u) {
        stage16(t, a0, b0);
        stage16(t + 256u, a1, b1);
        workgroupBarrier();
        if (k0 + 16u < p.k_end) {
            a0 = load_a16(a_base, tile_row, k0 + 16u, t);
            a1 = load_a16(a_base, tile_row, k0 + 16u, t + 256u);
            b0 = load_b16(b_base, tile_col, k0 + 16u, t);
            b1 = load_b16(b_base, tile_col, k0 + 16u, t + 256u);
        }
        for (var kk = 0u; kk < 16u; kk = kk + 1u) {
            outer8(a_slab16[kk * 32u + lid.y], a_slab16[kk * 32u + 16u + lid.y], b_slab16[kk * 32u + lid.x], b_slab16[kk * 32u + 16u + lid.x]);
        }
        workgroupBarrier();
    }
    store_block8(wid.z * p.m * p.n, tile_row + lid.y * 4u, tile_col + lid.x * 4u, 64u, 64u);
}
