// The activations a fused kernel applies, shared by elementwise.wgsl (bias_act) and norm.wgsl (batch norm):
// each is compiled with this file in front. ACT: 0 identity, 1 relu, 2 sigmoid, 3 tanh.

override ACT: u32 = 0u;

fn sigmoid(v: f32) -> f32 {
    // Stable on both sides: exp never overflows.
    if (v >= 0.0) { return 1.0 / (1.0 + exp(-v)); }
    let e = exp(v);
    return e / (1.0 + e);
}

fn activate(v: f32) -> f32 {
    switch ACT {
        case 1u: { return max(v, 0.0); }
        case 2u: { return sigmoid(v); }
        case 3u: { return tanh(v); }
        default: { return v; }
    }
}

// act'(pre) from y = act(pre): relu y > 0, sigmoid y (1 - y), tanh 1 - y^2.
fn activation_slope(y: f32) -> f32 {
    switch ACT {
        case 1u: { return select(0.0, 1.0, y > 0.0); }
        case 2u: { return y * (1.0 - y); }
        case 3u: { return 1.0 - y * y; }
        default: { return 1.0; }
    }
}
