// Data movement: one strided copy serves permute/transpose, expand (stride 0), slice, the backward of slice
// (writing into a zeroed buffer) and concat (each piece into its region).
// dst[dst_offset + sum(idx_d * dst_stride_d)] = src[src_offset + sum(idx_d * src_stride_d)] for idx in shape.

struct CopyParams {
    n: u32,
    ndim: u32,
    src_offset: u32,
    dst_offset: u32,
    shape: array<vec4<u32>, 2>,
    src_stride: array<vec4<u32>, 2>,
    dst_stride: array<vec4<u32>, 2>,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> cp: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn strided_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= cp.n) { return; }
    var rem = i;
    var s = cp.src_offset;
    var t = cp.dst_offset;
    for (var d = i32(cp.ndim) - 1; d >= 0; d = d - 1) {
        let size = cp.shape[d / 4][d % 4];
        let idx = rem % size;
        rem = rem / size;
        s = s + idx * cp.src_stride[d / 4][d % 4];
        t = t + idx * cp.dst_stride[d / 4][d % 4];
    }
    dst[t] = src[s];
}
