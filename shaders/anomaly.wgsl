// Anomaly detection: flags the first op of a step whose output holds a NaN or an infinity.
//   values: [n] (binding 1), first_bad: one u32 (binding 2), the smallest op number seen with a bad value
// A float is NaN or infinite when its exponent bits are all ones: tested on the bits, because a compiler
// may assume no NaNs and fold `v != v` away.
struct CheckParams { n: u32, op: u32, _pad0: u32, _pad1: u32 }

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> cp: CheckParams;
@group(0) @binding(1) var<storage, read> values: array<f32>;
@group(0) @binding(2) var<storage, read_write> first_bad: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn check_finite(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= cp.n) { return; }
    if ((bitcast<u32>(values[i]) & 0x7f800000u) == 0x7f800000u) {
        atomicMin(&first_bad[0], cp.op);
    }
}
