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
