// Elementwise kernels: unary ops (with two scalar parameters) and binary ops with broadcasting.
// The op is an `override` constant, so each op is its own specialised pipeline and the switch folds away.
// sigmoid, activate and activation_slope: activation.wgsl, compiled in front of this file.

// ---- unary: y[i] = f(x[i]; alpha, beta) ----------------------------------------------------------------
// x: [n], y: [n]
struct UnaryParams { n: u32, _pad: u32, alpha: f32, beta: f32 }

override OP: u32 = 0u;
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> up: UnaryParams;
@group(0) @binding(1) var<storage, read> ux: array<f32>;
@group(0) @binding(2) var<storage, read_write> uy: array<f32>;

fn softplus(v: f32) -> f32 {
    // log(1 + e^v) = max(v, 0) + log(1 + e^-|v|)
    return max(v, 0.0) + log(1.0 + exp(-abs(v)));
}

// Abramowitz and Stegun 7.1.26: |error| <= 1.5e-7, below f32's resolution of erf near 1.
fn erf_approx(v: f32) -> f32 {
    let x = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
    return sign(v) * (1.0 - poly * exp(-x * x));
}

fn unary_op(v: f32, a: f32, b: f32) -> f32 {
    switch OP {
        case 0u: { return -v; }                                  // NEG
        case 1u: { return exp(v); }                              // EXP
        case 2u: { return log(v); }                              // LOG
        case 3u: { return sqrt(v); }                             // SQRT
        case 4u: { return abs(v); }                              // ABS
        case 5u: { return sigmoid(v); }                          // SIGMOID
        case 6u: { return tanh(v); }                             // TANH
        case 7u: { return max(v, 0.0); }                         // RELU
        case 8u: { return select(a * v, v, v > 0.0); }           // LEAKY_RELU(alpha)
        case 9u: { return softplus(v); }                         // SOFTPLUS
        case 10u: { return clamp(v, a, b); }                     // CLAMP(lo, hi)
        // POWF(p); WGSL leaves pow(0, 0) undefined (lavapipe gives 0), and x^0 = 1 is what the second
        // derivative of x^2 needs at x = 0.
        case 11u: { return select(pow(abs(v), a) * select(1.0, sign(v), fract(a * 0.5) != 0.0 && fract(a) == 0.0), 1.0, a == 0.0); }
        case 12u: { return a * v + b; }                          // AFFINE(scale, shift)
        case 13u: { return select(0.0, 1.0, v > 0.0); }          // STEP: relu'
        case 14u: { return sign(v); }                            // SIGN: abs'
        case 15u: { return select(a, 1.0, v > 0.0); }            // LEAKY_STEP(alpha): leaky_relu'
        case 16u: { return select(0.0, 1.0, v >= a && v <= b); } // IN_RANGE(lo, hi): clamp'
        case 17u: { return a; }                                  // FILL(value)
        case 18u: { return erf_approx(v); }                      // ERF
        default: { return v; }                                   // IDENTITY
    }
}

@compute @workgroup_size(WG)
fn unary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= up.n) { return; }
    uy[i] = unary_op(ux[i], up.alpha, up.beta);
}

// ---- binary: out[i] = f(a[ia], b[ib]) with numpy broadcasting through strides (0 on broadcast axes) -------
// a: any shape broadcastable to out, b: likewise, out: [shape] contiguous, rank <= 8
struct BinaryParams {
    n: u32,
    ndim: u32,
    _pad0: u32,
    _pad1: u32,
    shape: array<vec4<u32>, 2>,
    stride_a: array<vec4<u32>, 2>,
    stride_b: array<vec4<u32>, 2>,
}

override BROADCAST: bool = true;

@group(0) @binding(0) var<uniform> bp: BinaryParams;
@group(0) @binding(1) var<storage, read> ba: array<f32>;
@group(0) @binding(2) var<storage, read> bb: array<f32>;
@group(0) @binding(3) var<storage, read_write> bout: array<f32>;

fn binary_op(x: f32, y: f32) -> f32 {
    switch OP {
        case 0u: { return x + y; }                     // ADD
        case 1u: { return x - y; }                     // SUB
        case 2u: { return x * y; }                     // MUL
        case 3u: { return x / y; }                     // DIV
        case 4u: { return max(x, y); }                 // MAXIMUM
        case 5u: { return min(x, y); }                 // MINIMUM
        case 6u: { return select(0.0, 1.0, x == y); }  // EQ (mask)
        case 7u: { return select(0.0, 1.0, x > y); }   // GT (mask)
        default: { return x; }
    }
}

@compute @workgroup_size(WG)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= bp.n) { return; }
    if (!BROADCAST) {
        bout[i] = binary_op(ba[i], bb[i]);
        return;
    }
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(bp.ndim) - 1; d >= 0; d = d - 1) {
        let size = bp.shape[d / 4][d % 4];
        let idx = rem % size;
        rem = rem / size;
        ia = ia + idx * bp.stride_a[d / 4][d % 4];
        ib = ib + idx * bp.stride_b[d / 4][d % 4];
    }
    bout[i] = binary_op(ba[ia], bb[ib]);
}

// ---- bias_act: a layer's bias and activation in one pass (what Linear/Conv2d + activation fuse into) ------
// bias_act_forward: y[i] = act(x[i] + bias[(i / inner) % channels])    x, y: [outer, channels, inner], bias: [channels]
// act_backward:     g_pre[i] = g[i] * act'(pre[i]), written with y = act(pre)    g, y, g_pre: [n]
// ACT (activation.wgsl): 0 identity, 1 relu, 2 sigmoid, 3 tanh
struct BiasActParams { n: u32, channels: u32, inner: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> bap: BiasActParams;
@group(0) @binding(1) var<storage, read> ba_x: array<f32>;
@group(0) @binding(2) var<storage, read> ba_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> ba_y: array<f32>;

@compute @workgroup_size(WG)
fn bias_act_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= bap.n) { return; }
    ba_y[i] = activate(ba_x[i] + ba_b[(i / bap.inner) % bap.channels]);
}

@compute @workgroup_size(WG)
fn act_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= bap.n) { return; }
    ba_y[i] = ba_x[i] * activation_slope(ba_b[i]);
}

// The same two with texture reads and 16-byte stores, 4 elements per invocation (CPU adapters; texel.wgsl).
// y4 is bound rounded up to whole texels: the last one's spare lanes are written and never read.
@group(0) @binding(1) var<storage, read_write> ba_y4: array<vec4<f32>>;
@group(0) @binding(2) var ba_x_tex: texture_2d<f32>;
@group(0) @binding(3) var ba_b_tex: texture_2d<f32>;

@compute @workgroup_size(WG)
fn bias_act_forward4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let v = gid.x + gid.y * nwg.x * WG;
    let i = 4u * v;
    if (i >= bap.n) { return; }
    var b: vec4<f32>;
    if (bap.inner % 4u == 0u) {
        b = vec4<f32>(texel_elem(ba_b_tex, (i / bap.inner) % bap.channels)); // one channel per texel
    } else {
        let c = (vec4<u32>(i) + vec4<u32>(0u, 1u, 2u, 3u)) / bap.inner % bap.channels;
        b = vec4<f32>(texel_elem(ba_b_tex, c.x), texel_elem(ba_b_tex, c.y), texel_elem(ba_b_tex, c.z), texel_elem(ba_b_tex, c.w));
    }
    let x = texel(ba_x_tex, v) + b;
    ba_y4[v] = vec4<f32>(activate(x.x), activate(x.y), activate(x.z), activate(x.w));
}

@compute @workgroup_size(WG)
fn act_backward4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let v = gid.x + gid.y * nwg.x * WG;
    if (4u * v >= bap.n) { return; }
    let y = texel(ba_b_tex, v);
    ba_y4[v] = texel(ba_x_tex, v) * vec4<f32>(activation_slope(y.x), activation_slope(y.y), activation_slope(y.z), activation_slope(y.w));
}

// ---- random_uniform: y[i] = U[0, 1) from a counter-based hash of (seed, offset + i) ------------------------
// Seeded on the GPU and independent of the dispatch shape, so the same seed gives the same numbers anywhere.
// y: [n]
struct RandomParams { n: u32, seed_lo: u32, seed_hi: u32, offset: u32 }

@group(0) @binding(0) var<uniform> rp: RandomParams;
@group(0) @binding(1) var<storage, read_write> random_out: array<f32>;

fn pcg_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

@compute @workgroup_size(WG)
fn random_uniform(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= rp.n) { return; }
    let h = pcg_hash(pcg_hash(rp.offset + i) ^ pcg_hash(rp.seed_lo) ^ (rp.seed_hi * 0x9E3779B9u));
    // 24 random bits -> [0, 1)
    random_out[i] = f32(h >> 8u) * (1.0 / 16777216.0);
}
