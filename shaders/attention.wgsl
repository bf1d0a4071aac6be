// Scaled dot-product attention, fused (flash-style): softmax(q k^T * scale + mask) v with optional dropout on
// the probabilities, without ever storing the [tq, tk] score matrix. Forward keeps a running max and sum per
// query row over tiles of keys and saves the row's log-sum-exp; backward recomputes the probabilities from it.
//   attn_forward   q [B, tq, d], k [B, tk, d], v [B, tk, dv], mask [tq, tk] or [B, tq, tk] (additive)
//                  -> o [B, tq, dv], lse [B, tq]
//                  one invocation per query row, 64 rows per workgroup, keys in tiles of FT rows shared
//                  through workgroup memory (causal: only the tiles at or before the group's last row)
//   attn_backward  the same inputs, o, do [B, tq, dv], lse -> dqkv = [dq [B, tq, d], dk [B, tk, d], dv [B, tk, dv]]
//                  workgroups of two kinds in one dispatch: the first ceil(tq / 64) per batch compute dq for 64
//                  query rows (keys in tiles), the rest dk and dv for 64 key rows (queries in tiles); with
//                  D_i = do_i . o_i, p_ij = exp(s_ij - lse_i), ds_ij = p_ij (dp_ij - D_i):
//                  dq_i = scale sum_j ds_ij k_j, dk_j = scale sum_i ds_ij q_i, dv_j = sum_i p~_ij do_i
// Dropout (p_drop > 0) keeps p_ij with probability 1 - p_drop, scaled by 1 / (1 - p_drop), by a hash of
// (seed, batch row, query, key): the same in both passes, whatever the tiling. d and dv are at most MAXD.
// Chunks: one dispatch may cover only keys [k_lo, k_hi) (forward and dq) and queries [q_lo, q_hi) (dk, dv);
// a chunk after the first resumes from what the earlier ones wrote (forward: m = lse, l = 1, acc = o, the
// same running state; backward: gradients added). CPU adapters need this: lavapipe ends an invocation's
// loops after 65535 iterations in all, so a long row runs as several dispatches.
struct AttnParams {
    batch: u32,
    tq: u32,
    tk: u32,
    d: u32,
    dv: u32,
    causal: u32,
    has_mask: u32,
    mask_bstride: u32,
    scale: f32,
    p_drop: f32,
    seed_lo: u32,
    seed_hi: u32,
    k_lo: u32,
    k_hi: u32,
    q_lo: u32,
    q_hi: u32,
}

const MAXD: u32 = 128u;
// The head sizes, specialised per pipeline (loops of a constant count compile to straight-line code on CPU
// adapters, where a dynamic count keeps the row arrays in memory).
override DQ: u32 = 64u;
override DV: u32 = 64u;
const FT: u32 = 16u;
const BT: u32 = 8u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> ap: AttnParams;

fn mix(x: u32) -> u32 {
    var h = x;
    h = h ^ (h >> 16u);
    h = h * 0x7feb352du;
    h = h ^ (h >> 15u);
    h = h * 0x846ca68bu;
    h = h ^ (h >> 16u);
    return h;
}

// The factor dropout applies to p_ij: 0, or 1 / (1 - p_drop).
fn keep_factor(b: u32, i: u32, j: u32) -> f32 {
    if (ap.p_drop <= 0.0) { return 1.0; }
    let h = mix(ap.seed_lo ^ mix(ap.seed_hi ^ mix(b * ap.tq + i) ^ (j * 0x9e3779b9u)));
    let u = f32(h >> 8u) * (1.0 / 16777216.0);
    return select(0.0, 1.0 / (1.0 - ap.p_drop), u >= ap.p_drop);
}

fn mask_at(b: u32, i: u32, j: u32) -> f32 {
    if (ap.has_mask == 0u) { return 0.0; }
    return f_mask[b * ap.mask_bstride + i * ap.tk + j];
}

@group(0) @binding(1) var<storage, read> f_q: array<f32>;
@group(0) @binding(2) var<storage, read> f_k: array<f32>;
@group(0) @binding(3) var<storage, read> f_v: array<f32>;
@group(0) @binding(4) var<storage, read> f_mask: array<f32>;
@group(0) @binding(5) var<storage, read_write> f_o: array<f32>;
@group(0) @binding(6) var<storage, read_write> f_lse: array<f32>;

var<workgroup> k_tile: array<f32, 2048>;

// A later chunk's start: the running state (m, l, acc) that gives the stored o and lse.
fn resume(row: u32, m: ptr<function, f32>, l: ptr<function, f32>, acc: ptr<function, array<f32, 128>>) {
    *m = f_lse[row];
    *l = 1.0;
    for (var c = 0u; c < DV; c = c + 1u) { (*acc)[c] = f_o[row * ap.dv + c]; }
}
var<workgroup> v_tile: array<f32, 2048>;

@compute @workgroup_size(64)
fn attn_forward(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.y;
    let i0 = wid.x * 64u;
    let i = i0 + lid.x;
    let live = i < ap.tq;
    var q: array<f32, 128>;
    var acc: array<f32, 128>;
    if (live) {
        for (var c = 0u; c < DQ; c = c + 1u) { q[c] = f_q[(b * ap.tq + i) * ap.d + c]; }
    }
    for (var c = 0u; c < DV; c = c + 1u) { acc[c] = 0.0; }
    var m = NEG;
    var l = 0.0;
    if (live && ap.k_lo > 0u) { resume(b * ap.tq + i, &m, &l, &acc); }
    var kend = min(ap.tk, ap.k_hi);
    if (ap.causal != 0u) { kend = min(kend, i0 + 64u); }
    let tiles = (max(kend, ap.k_lo) - ap.k_lo + FT - 1u) / FT;
    for (var t = 0u; t < tiles; t = t + 1u) {
        let j0 = ap.k_lo + t * FT;
        // Only the tile's d (and dv) columns are loaded; rows past the chunk are never read.
        for (var e = lid.x; e < FT * ap.d; e = e + 64u) {
            let j = j0 + e / ap.d;
            if (j < kend) { k_tile[(e / ap.d) * MAXD + e % ap.d] = f_k[(b * ap.tk + j) * ap.d + e % ap.d]; }
        }
        for (var e = lid.x; e < FT * ap.dv; e = e + 64u) {
            let j = j0 + e / ap.dv;
            if (j < kend) { v_tile[(e / ap.dv) * MAXD + e % ap.dv] = f_v[(b * ap.tk + j) * ap.dv + e % ap.dv]; }
        }
        workgroupBarrier();
        if (live) {
            for (var r = 0u; r < FT; r = r + 1u) {
                let j = j0 + r;
                if (j >= kend || (ap.causal != 0u && j > i)) { break; }
                var s = 0.0;
                for (var c = 0u; c < DQ; c = c + 1u) { s = s + q[c] * k_tile[r * MAXD + c]; }
                s = s * ap.scale + mask_at(b, i, j);
                let m_new = max(m, s);
                let shrink = exp(m - m_new);
                let p = exp(s - m_new);
                l = l * shrink + p;
                let pk = p * keep_factor(b, i, j);
                for (var c = 0u; c < DV; c = c + 1u) { acc[c] = acc[c] * shrink + pk * v_tile[r * MAXD + c]; }
                m = m_new;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < DV; c = c + 1u) { f_o[(b * ap.tq + i) * ap.dv + c] = acc[c] / l; }
        f_lse[b * ap.tq + i] = m + log(l);
    }
}

@group(0) @binding(1) var<storage, read> g_q: array<f32>;
@group(0) @binding(2) var<storage, read> g_k: array<f32>;
@group(0) @binding(3) var<storage, read> g_v: array<f32>;
@group(0) @binding(4) var<storage, read> g_mask: array<f32>;
@group(0) @binding(5) var<storage, read> g_o: array<f32>;
@group(0) @binding(6) var<storage, read> g_do: array<f32>;
@group(0) @binding(7) var<storage, read> g_lse: array<f32>;
@group(0) @binding(8) var<storage, read_write> g_dqkv: array<f32>;

var<workgroup> a_tile: array<f32, 1024>;
var<workgroup> c_tile: array<f32, 1024>;
var<workgroup> row_lse: array<f32, 8>;
var<workgroup> row_d: array<f32, 8>;

fn gmask_at(b: u32, i: u32, j: u32) -> f32 {
    if (ap.has_mask == 0u) { return 0.0; }
    return g_mask[b * ap.mask_bstride + i * ap.tk + j];
}

@compute @workgroup_size(64)
fn attn_backward(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.y;
    let q_groups = (ap.tq + 63u) / 64u;
    var x: array<f32, 128>;
    var y: array<f32, 128>;
    var gx: array<f32, 128>;
    var gy: array<f32, 128>;
    if (wid.x < q_groups) {
        // dq for query row i: x = q_i, y = do_i; keys and values in tiles (a = k, c = v).
        let i0 = wid.x * 64u;
        let i = i0 + lid.x;
        let live = i < ap.tq;
        var dd = 0.0;
        var lse = 0.0;
        if (live) {
            for (var c = 0u; c < DQ; c = c + 1u) { x[c] = g_q[(b * ap.tq + i) * ap.d + c]; gx[c] = 0.0; }
            for (var c = 0u; c < DV; c = c + 1u) {
                y[c] = g_do[(b * ap.tq + i) * ap.dv + c];
                dd = dd + y[c] * g_o[(b * ap.tq + i) * ap.dv + c];
            }
            lse = g_lse[b * ap.tq + i];
        }
        var kend = min(ap.tk, ap.k_hi);
        if (ap.causal != 0u) { kend = min(kend, i0 + 64u); }
        let tiles = (max(kend, ap.k_lo) - ap.k_lo + BT - 1u) / BT;
        for (var t = 0u; t < tiles; t = t + 1u) {
            let j0 = ap.k_lo + t * BT;
            for (var e = lid.x; e < BT * ap.d; e = e + 64u) {
                let j = j0 + e / ap.d;
                if (j < kend) { a_tile[(e / ap.d) * MAXD + e % ap.d] = g_k[(b * ap.tk + j) * ap.d + e % ap.d]; }
            }
            for (var e = lid.x; e < BT * ap.dv; e = e + 64u) {
                let j = j0 + e / ap.dv;
                if (j < kend) { c_tile[(e / ap.dv) * MAXD + e % ap.dv] = g_v[(b * ap.tk + j) * ap.dv + e % ap.dv]; }
            }
            workgroupBarrier();
            if (live) {
                for (var r = 0u; r < BT; r = r + 1u) {
                    let j = j0 + r;
                    if (j >= kend || (ap.causal != 0u && j > i)) { break; }
                    var s = 0.0;
                    for (var c = 0u; c < DQ; c = c + 1u) { s = s + x[c] * a_tile[r * MAXD + c]; }
                    let p = exp(s * ap.scale + gmask_at(b, i, j) - lse);
                    var dp = 0.0;
                    for (var c = 0u; c < DV; c = c + 1u) { dp = dp + y[c] * c_tile[r * MAXD + c]; }
                    let ds = p * (dp * keep_factor(b, i, j) - dd);
                    for (var c = 0u; c < DQ; c = c + 1u) { gx[c] = gx[c] + ds * a_tile[r * MAXD + c]; }
                }
            }
            workgroupBarrier();
        }
        if (live) {
            let at = (b * ap.tq + i) * ap.d;
            if (ap.k_lo > 0u) {
                for (var c = 0u; c < DQ; c = c + 1u) { g_dqkv[at + c] = g_dqkv[at + c] + gx[c] * ap.scale; }
            } else {
                for (var c = 0u; c < DQ; c = c + 1u) { g_dqkv[at + c] = gx[c] * ap.scale; }
            }
        }
        return;
    }
    // dk and dv for key row j: x = k_j, y = v_j; queries and output gradients in tiles (a = q, c = do).
    let j0k = (wid.x - q_groups) * 64u;
    let j = j0k + lid.x;
    let live = j < ap.tk;
    if (live) {
        for (var c = 0u; c < DQ; c = c + 1u) { x[c] = g_k[(b * ap.tk + j) * ap.d + c]; gx[c] = 0.0; }
        for (var c = 0u; c < DV; c = c + 1u) { y[c] = g_v[(b * ap.tk + j) * ap.dv + c]; gy[c] = 0.0; }
    }
    // Causal: key j gets gradient from queries i >= j only.
    var qstart = ap.q_lo;
    if (ap.causal != 0u) { qstart = max(qstart, j0k); }
    let qend = min(ap.tq, ap.q_hi);
    let tiles = (max(qend, qstart) - qstart + BT - 1u) / BT;
    for (var t = 0u; t < tiles; t = t + 1u) {
        let i0 = qstart + t * BT;
        for (var e = lid.x; e < BT * ap.d; e = e + 64u) {
            let i = i0 + e / ap.d;
            if (i < qend) { a_tile[(e / ap.d) * MAXD + e % ap.d] = g_q[(b * ap.tq + i) * ap.d + e % ap.d]; }
        }
        for (var e = lid.x; e < BT * ap.dv; e = e + 64u) {
            let i = i0 + e / ap.dv;
            if (i < qend) { c_tile[(e / ap.dv) * MAXD + e % ap.dv] = g_do[(b * ap.tq + i) * ap.dv + e % ap.dv]; }
        }
        if (lid.x < BT) {
            let i = i0 + lid.x;
            var dd = 0.0;
            var lse = 0.0;
            if (i < qend) {
                for (var c = 0u; c < DV; c = c + 1u) { dd = dd + g_do[(b * ap.tq + i) * ap.dv + c] * g_o[(b * ap.tq + i) * ap.dv + c]; }
                lse = g_lse[b * ap.tq + i];
            }
            row_d[lid.x] = dd;
            row_lse[lid.x] = lse;
        }
        workgroupBarrier();
        if (live) {
            for (var r = 0u; r < BT; r = r + 1u) {
                let i = i0 + r;
                if (i >= qend) { break; }
                if (ap.causal != 0u && j > i) { continue; }
                var s = 0.0;
                for (var c = 0u; c < DQ; c = c + 1u) { s = s + a_tile[r * MAXD + c] * x[c]; }
                let p = exp(s * ap.scale + gmask_at(b, i, j) - row_lse[r]);
                let kf = keep_factor(b, i, j);
                var dp = 0.0;
                for (var c = 0u; c < DV; c = c + 1u) {
                    dp = dp + c_tile[r * MAXD + c] * y[c];
                    gy[c] = gy[c] + p * kf * c_tile[r * MAXD + c];
                }
                let ds = p * (dp * kf - row_d[r]);
                for (var c = 0u; c < DQ; c = c + 1u) { gx[c] = gx[c] + ds * a_tile[r * MAXD + c]; }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let dk0 = ap.batch * ap.tq * ap.d;
        let dv0 = dk0 + ap.batch * ap.tk * ap.d;
        let at_k = dk0 + (b * ap.tk + j) * ap.d;
        let at_v = dv0 + (b * ap.tk + j) * ap.dv;
        if (ap.q_lo > 0u) {
            for (var c = 0u; c < DQ; c = c + 1u) { g_dqkv[at_k + c] = g_dqkv[at_k + c] + gx[c] * ap.scale; }
            for (var c = 0u; c < DV; c = c + 1u) { g_dqkv[at_v + c] = g_dqkv[at_v + c] + gy[c]; }
        } else {
            for (var c = 0u; c < DQ; c = c + 1u) { g_dqkv[at_k + c] = gx[c] * ap.scale; }
            for (var c = 0u; c < DV; c = c + 1u) { g_dqkv[at_v + c] = gy[c]; }
        }
    }
}

// attn_forward without workgroup tiles: each invocation reads its keys and values from global memory (for
// adapters where workgroup memory and barriers cost more than they save: CPU adapters).
@compute @workgroup_size(64)
fn attn_forward_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= ap.batch * ap.tq) { return; }
    let b = row / ap.tq;
    let i = row % ap.tq;
    var q: array<f32, 128>;
    var acc: array<f32, 128>;
    for (var c = 0u; c < DQ; c = c + 1u) { q[c] = f_q[row * ap.d + c]; }
    for (var c = 0u; c < DV; c = c + 1u) { acc[c] = 0.0; }
    var m = NEG;
    var l = 0.0;
    if (ap.k_lo > 0u) { resume(row, &m, &l, &acc); }
    var kend = min(ap.tk, ap.k_hi);
    if (ap.causal != 0u) { kend = min(kend, i + 1u); }
    for (var j = ap.k_lo; j < kend; j = j + 1u) {
        var s = 0.0;
        let k0 = (b * ap.tk + j) * ap.d;
        for (var c = 0u; c < DQ; c = c + 1u) { s = s + q[c] * f_k[k0 + c]; }
        s = s * ap.scale + mask_at(b, i, j);
        let m_new = max(m, s);
        let shrink = exp(m - m_new);
        let p = exp(s - m_new);
        l = l * shrink + p;
        let pk = p * keep_factor(b, i, j);
        let v0 = (b * ap.tk + j) * ap.dv;
        for (var c = 0u; c < DV; c = c + 1u) { acc[c] = acc[c] * shrink + pk * f_v[v0 + c]; }
        m = m_new;
    }
    for (var c = 0u; c < DV; c = c + 1u) { f_o[row * ap.dv + c] = acc[c] / l; }
    f_lse[row] = m + log(l);
}
