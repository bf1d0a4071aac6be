// SiLU, x * sigmoid(x) (PyTorch's nn.SiLU), forward and backward; one thread per element.
//   silu_forward:  x [n] (binding 1) -> y [n] (binding 2)
//   silu_backward: grad_y [n] (binding 1), x [n] (binding 2) -> grad_x [n] (binding 3)
const WG: u32 = 256u;

struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;

@group(0) @binding(1) var<storage, read> fx: array<f32>;
@group(0) @binding(2) var<storage, read_write> fy: array<f32>;

@compute @workgroup_size(256)
fn silu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= params.n) { return; }
    let x = fx[i];
    fy[i] = x / (1.0 + exp(-x));
}

@group(0) @binding(1) var<storage, read> grad_y: array<f32>;
@group(0) @binding(2) var<storage, read> bx: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad_x: array<f32>;

// d/dx x s(x) = s(x) (1 + x (1 - s(x)))
@compute @workgroup_size(256)
fn silu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= params.n) { return; }
    let x = bx[i];
    let s = 1.0 / (1.0 + exp(-x));
    grad_x[i] = grad_y[i] * s * (1.0 + x * (1.0 - s));
}
