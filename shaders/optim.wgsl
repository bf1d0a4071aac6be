// Optimizer updates over flat buffers: one dispatch updates every parameter of a model.
// grad: [n] read-only; param and the optimizer state: [n] read-write. Elements before `decay_end` get weight
// decay (the store puts decayed weights first, so biases and norms are left alone).

struct OptParams {
    n: u32,
    decay_end: u32,
    lr: f32,
    weight_decay: f32,
    beta1: f32,        // Adam beta1, RMSprop alpha, SGD momentum
    beta2: f32,        // Adam beta2
    eps: f32,
    bias1: f32,        // Adam: 1 - beta1^t
    bias2: f32,        // Adam: 1 - beta2^t
    nesterov: u32,     // SGD
    decoupled: u32,    // AdamW-style decay (param *= 1 - lr*wd) instead of L2 added to the gradient
    _pad: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> o: OptParams;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> state1: array<f32>;
@group(0) @binding(4) var<storage, read_write> state2: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * WG; }

fn decay(i: u32) -> f32 { return select(0.0, o.weight_decay, i < o.decay_end); }

// SGD with momentum (Nesterov optional); momentum 0 is plain gradient descent. state1 = velocity.
@compute @workgroup_size(WG)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= o.n) { return; }
    let g = grad[i] + decay(i) * param[i];
    let v = o.beta1 * state1[i] + g;
    state1[i] = v;
    let step = select(v, g + o.beta1 * v, o.nesterov != 0u);
    param[i] = param[i] - o.lr * step;
}

// RMSprop: state1 = running mean of g^2 (alpha = beta1).
@compute @workgroup_size(WG)
fn rmsprop_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= o.n) { return; }
    let g = grad[i] + decay(i) * param[i];
    let s = o.beta1 * state1[i] + (1.0 - o.beta1) * g * g;
    state1[i] = s;
    param[i] = param[i] - o.lr * g / (sqrt(s) + o.eps);
}

// Adam / AdamW: state1 = m, state2 = v, bias-corrected.
@compute @workgroup_size(WG)
fn adam_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= o.n) { return; }
    var g = grad[i];
    var w = param[i];
    if (o.decoupled != 0u) {
        w = w * (1.0 - o.lr * decay(i));
    } else {
        g = g + decay(i) * w;
    }
    let m = o.beta1 * state1[i] + (1.0 - o.beta1) * g;
    let v = o.beta2 * state2[i] + (1.0 - o.beta2) * g * g;
    state1[i] = m;
    state2[i] = v;
    param[i] = w - o.lr * (m / o.bias1) / (sqrt(v / o.bias2) + o.eps);
}

// adam_step with texture reads of all four inputs and 16-byte stores, 4 parameters per invocation (CPU
// adapters; texel.wgsl). The textures are copies taken before this dispatch; the buffers are bound rounded up
// to whole texels (the last one's spare lanes are written and never read).
@group(0) @binding(1) var<storage, read_write> param4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> state14: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> state24: array<vec4<f32>>;
@group(0) @binding(4) var grad_tex: texture_2d<f32>;
@group(0) @binding(5) var param_tex: texture_2d<f32>;
@group(0) @binding(6) var state1_tex: texture_2d<f32>;
@group(0) @binding(7) var state2_tex: texture_2d<f32>;

@compute @workgroup_size(WG)
fn adam_step4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = index(gid, nwg);
    if (4u * t >= o.n) { return; }
    let decays = select(vec4<f32>(0.0), vec4<f32>(o.weight_decay), vec4<u32>(4u * t) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(o.decay_end));
    var g = texel(grad_tex, t);
    var w = texel(param_tex, t);
    if (o.decoupled != 0u) {
        w = w * (1.0 - o.lr * decays);
    } else {
        g = g + decays * w;
    }
    let m = o.beta1 * texel(state1_tex, t) + (1.0 - o.beta1) * g;
    let v = o.beta2 * texel(state2_tex, t) + (1.0 - o.beta2) * g * g;
    state14[t] = m;
    state24[t] = v;
    param4[t] = w - o.lr * (m / o.bias1) / (sqrt(v / o.bias2) + o.eps);
}
