// The shared part of matmul.wgsl and matmul_subgroup.wgsl (each is compiled with this file in front):
// params, bindings and the operand accessors.
//   A: [batch, M, K] ([batch, K, M] if TRANS_A)   B: [batch, K, N] ([batch, N, K] if TRANS_B)   C: [batch, M, N]
// A batch stride of 0 broadcasts that operand over the batch (a weight shared by every sample).

// Each dispatch sums k in [k_begin, k_end) and adds to C when ACCUMULATE is set: the launcher splits long k
// ranges into several dispatches (lavapipe ends an invocation's loops after 65535 iterations in all). An
// override, not a param, so a product that does not accumulate never reads C (a select would read it anyway:
// on lavapipe a storage read costs more than the store).
struct MatmulParams {
    m: u32, n: u32, k: u32, a_batch_stride: u32, b_batch_stride: u32, k_begin: u32, k_end: u32, _unused: u32,
    // The convolution conv_gemm (matmul_subgroup.wgsl) gathers B from; plain products leave these 0.
    c_in: u32, h: u32, w: u32, kh: u32, kw: u32, oh: u32, ow: u32,
    stride_h: u32, stride_w: u32, pad_h: u32, pad_w: u32, dil_h: u32, dil_w: u32, _pad: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override ACCUMULATE: bool = false;

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
