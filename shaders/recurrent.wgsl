// Fused recurrent cells: one time step of a whole batch per dispatch, forward and backward. The recurrent
// product h W_hh^T (and, backward, dgates W_hh) runs as a matmul between the steps; everything else of a step
// is here, so a step costs two dispatches each way instead of a dozen small ops and their slices.
//
// KIND: 0 tanh RNN (1 gate block), 1 LSTM (i, f, g, o), 2 GRU (r, z, n), PyTorch's equations and gate order.
// n sequences, H hidden, G gate blocks, GH = G * H. One invocation per (sequence b, unit j).
// States live in `st`, one slot per step boundary: slot = [h [n, H], c [n, H] (LSTM)], slots `slot` floats
// apart (padded so each slot's h binds at an aligned offset for the matmul). A step reads slot `before` and
// writes slot `after`. Past a sequence's length (lens[b] <= t, when has_len) the state is held.
// Saved activations per row (A floats): tanh nothing (h is in st), LSTM i f g o, GRU r z n and
// hn = W_hn h + b_hn.
//   rnn_forward   xg [T * n, GH] (x W_ih^T + b_ih, every step), hg [n, GH] (h_before W_hh^T), b_hh [GH],
//                 lens [n] -> st slot `after`, acts [T, n, A] at step t
//   rnn_backward  acts, st, g_st (the gradient of st), dh_rec [n, H] (the next-processed step's dhg W_hh),
//                 lens, carry [2, n, H] (dh and dc passed straight to the state before)
//                 -> dxg [T, dstride] at t (the gradient of xg), dhg (of hg + b_hh), carry updated in place
struct RnnParams {
    n: u32,
    hidden: u32,
    t: u32,
    has_len: u32,
    before: u32,
    after: u32,
    acts_width: u32,
    dstride: u32,
}

override KIND: u32 = 1u;
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> rp: RnnParams;

fn sigm(v: f32) -> f32 {
    // Stable on both sides: exp never overflows.
    if (v >= 0.0) { return 1.0 / (1.0 + exp(-v)); }
    let e = exp(v);
    return e / (1.0 + e);
}

// tanh saturates to +-1 in f32 well before 15; clamping keeps drivers' exp-based tanh from overflowing.
fn tanh_s(v: f32) -> f32 {
    return tanh(clamp(v, -15.0, 15.0));
}

fn gates() -> u32 {
    switch KIND {
        case 0u: { return 1u; }
        case 1u: { return 4u; }
        default: { return 3u; }
    }
}

@group(0) @binding(1) var<storage, read> f_xg: array<f32>;
@group(0) @binding(2) var<storage, read> f_hg: array<f32>;
@group(0) @binding(3) var<storage, read> f_bhh: array<f32>;
@group(0) @binding(4) var<storage, read> lens: array<u32>;
@group(0) @binding(5) var<storage, read_write> f_st: array<f32>;
@group(0) @binding(6) var<storage, read_write> f_acts: array<f32>;

@compute @workgroup_size(WG)
fn rnn_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    let nh = rp.n * rp.hidden;
    if (e >= nh) { return; }
    let b = e / rp.hidden;
    let j = e % rp.hidden;
    let H = rp.hidden;
    let gh = gates() * H;
    let a0 = rp.t * rp.n * rp.acts_width + b * rp.acts_width;
    if (rp.has_len != 0u && rp.t >= lens[b]) {
        f_st[rp.after + e] = f_st[rp.before + e];
        if (KIND == 1u) { f_st[rp.after + nh + e] = f_st[rp.before + nh + e]; }
        return;
    }
    let x0 = (rp.t * rp.n + b) * gh;
    let h0 = b * gh;
    switch KIND {
        case 0u: {
            f_st[rp.after + e] = tanh_s(f_xg[x0 + j] + f_hg[h0 + j] + f_bhh[j]);
        }
        case 1u: {
            let i = sigm(f_xg[x0 + j] + f_hg[h0 + j] + f_bhh[j]);
            let f = sigm(f_xg[x0 + H + j] + f_hg[h0 + H + j] + f_bhh[H + j]);
            let g = tanh_s(f_xg[x0 + 2u * H + j] + f_hg[h0 + 2u * H + j] + f_bhh[2u * H + j]);
            let o = sigm(f_xg[x0 + 3u * H + j] + f_hg[h0 + 3u * H + j] + f_bhh[3u * H + j]);
            let c = f * f_st[rp.before + nh + e] + i * g;
            f_st[rp.after + e] = o * tanh_s(c);
            f_st[rp.after + nh + e] = c;
            f_acts[a0 + j] = i;
            f_acts[a0 + H + j] = f;
            f_acts[a0 + 2u * H + j] = g;
            f_acts[a0 + 3u * H + j] = o;
        }
        default: {
            let r = sigm(f_xg[x0 + j] + f_hg[h0 + j] + f_bhh[j]);
            let z = sigm(f_xg[x0 + H + j] + f_hg[h0 + H + j] + f_bhh[H + j]);
            let hn = f_hg[h0 + 2u * H + j] + f_bhh[2u * H + j];
            let nv = tanh_s(f_xg[x0 + 2u * H + j] + r * hn);
            // h' = (1 - z) n + z h
            f_st[rp.after + e] = nv + z * (f_st[rp.before + e] - nv);
            f_acts[a0 + j] = r;
            f_acts[a0 + H + j] = z;
            f_acts[a0 + 2u * H + j] = nv;
            f_acts[a0 + 3u * H + j] = hn;
        }
    }
}

@group(0) @binding(1) var<storage, read> b_acts: array<f32>;
@group(0) @binding(2) var<storage, read> b_st: array<f32>;
@group(0) @binding(3) var<storage, read> b_gst: array<f32>;
@group(0) @binding(4) var<storage, read> b_dhrec: array<f32>;
@group(0) @binding(5) var<storage, read> b_lens: array<u32>;
@group(0) @binding(6) var<storage, read_write> b_dxg: array<f32>;
@group(0) @binding(7) var<storage, read_write> b_dhg: array<f32>;
@group(0) @binding(8) var<storage, read_write> b_carry: array<f32>;

@compute @workgroup_size(WG)
fn rnn_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    let nh = rp.n * rp.hidden;
    if (e >= nh) { return; }
    let b = e / rp.hidden;
    let j = e % rp.hidden;
    let H = rp.hidden;
    let gh = gates() * H;
    let d0 = rp.t * rp.dstride + b * gh;
    var dh = b_gst[rp.after + e] + b_dhrec[e] + b_carry[e];
    var dc = 0.0;
    if (KIND == 1u) { dc = b_gst[rp.after + nh + e] + b_carry[nh + e]; }
    if (rp.has_len != 0u && rp.t >= b_lens[b]) {
        // A held state: its gradient passes to the state before, and the step's gates get none.
        for (var k = 0u; k < gh; k = k + H) {
            b_dxg[d0 + k + j] = 0.0;
            b_dhg[d0 + k + j] = 0.0;
        }
        b_carry[e] = dh;
        if (KIND == 1u) { b_carry[nh + e] = dc; }
        return;
    }
    let a0 = rp.t * rp.n * rp.acts_width + b * rp.acts_width;
    switch KIND {
        case 0u: {
            let h = b_st[rp.after + e];
            let dp = dh * (1.0 - h * h);
            b_dxg[d0 + j] = dp;
            b_dhg[d0 + j] = dp;
            b_carry[e] = 0.0;
        }
        case 1u: {
            let i = b_acts[a0 + j];
            let f = b_acts[a0 + H + j];
            let g = b_acts[a0 + 2u * H + j];
            let o = b_acts[a0 + 3u * H + j];
            let tc = tanh_s(b_st[rp.after + nh + e]);
            dc = dc + dh * o * (1.0 - tc * tc);
            let di = dc * g * i * (1.0 - i);
            let df = dc * b_st[rp.before + nh + e] * f * (1.0 - f);
            let dg = dc * i * (1.0 - g * g);
            let dout = dh * tc * o * (1.0 - o);
            b_dxg[d0 + j] = di;
            b_dxg[d0 + H + j] = df;
            b_dxg[d0 + 2u * H + j] = dg;
            b_dxg[d0 + 3u * H + j] = dout;
            b_dhg[d0 + j] = di;
            b_dhg[d0 + H + j] = df;
            b_dhg[d0 + 2u * H + j] = dg;
            b_dhg[d0 + 3u * H + j] = dout;
            b_carry[e] = 0.0;
            b_carry[nh + e] = dc * f;
        }
        default: {
            let r = b_acts[a0 + j];
            let z = b_acts[a0 + H + j];
            let nv = b_acts[a0 + 2u * H + j];
            let hn = b_acts[a0 + 3u * H + j];
            let dnp = dh * (1.0 - z) * (1.0 - nv * nv);
            let dzp = dh * (b_st[rp.before + e] - nv) * z * (1.0 - z);
            let drp = dnp * hn * r * (1.0 - r);
            b_dxg[d0 + j] = drp;
            b_dxg[d0 + H + j] = dzp;
            b_dxg[d0 + 2u * H + j] = dnp;
            b_dhg[d0 + j] = drp;
            b_dhg[d0 + H + j] = dzp;
            b_dhg[d0 + 2u * H + j] = dnp * r;
            b_carry[e] = dh * z;
        }
    }
}
