// The gradient of index_select along axis 0 (an embedding's backward) in O(indices x dim), not O(rows x
// indices x dim): a counting sort of the indices by table row, then each row's gradient summed over its
// occurrences in ascending index order, so the result does not depend on thread timing.
//   embed_count  idx [m] -> counts [rows] (zeroed first)
//   embed_scan   counts [rows] -> starts [rows + 1], exclusive prefix sums (one invocation; rows <= 65535)
//   embed_place  idx, starts -> cursor [rows] (zeroed first), order [m]: each row's occurrences in its segment
//   embed_sort   starts -> order, each row's segment sorted ascending (one invocation per row)
//   embed_sum    grad_out [m, dim], order, starts -> grad_table [rows, dim]
struct EmbedParams { m: u32, rows: u32, dim: u32, _pad: u32 }

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> ep: EmbedParams;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * WG; }

@group(0) @binding(1) var<storage, read> count_idx: array<u32>;
@group(0) @binding(2) var<storage, read_write> counts: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn embed_count(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = linear_id(gid, nwg);
    if (j >= ep.m) { return; }
    let r = count_idx[j];
    if (r < ep.rows) { atomicAdd(&counts[r], 1u); }
}

@group(0) @binding(1) var<storage, read> scan_counts: array<u32>;
@group(0) @binding(2) var<storage, read_write> scan_starts: array<u32>;

@compute @workgroup_size(1)
fn embed_scan() {
    var at = 0u;
    for (var r = 0u; r < ep.rows; r = r + 1u) {
        scan_starts[r] = at;
        at = at + scan_counts[r];
    }
    scan_starts[ep.rows] = at;
}

@group(0) @binding(1) var<storage, read> place_idx: array<u32>;
@group(0) @binding(2) var<storage, read> place_starts: array<u32>;
@group(0) @binding(3) var<storage, read_write> cursor: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> place_order: array<u32>;

@compute @workgroup_size(WG)
fn embed_place(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = linear_id(gid, nwg);
    if (j >= ep.m) { return; }
    let r = place_idx[j];
    if (r >= ep.rows) { return; }
    place_order[place_starts[r] + atomicAdd(&cursor[r], 1u)] = j;
}

@group(0) @binding(1) var<storage, read> sort_starts: array<u32>;
@group(0) @binding(2) var<storage, read_write> sort_order: array<u32>;

@compute @workgroup_size(WG)
fn embed_sort(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_id(gid, nwg);
    if (r >= ep.rows) { return; }
    let begin = sort_starts[r];
    let end = sort_starts[r + 1u];
    // Insertion sort: segments are short (a row's occurrences in one batch) and mostly in order already.
    for (var i = begin + 1u; i < end; i = i + 1u) {
        let v = sort_order[i];
        var k = i;
        loop {
            if (k <= begin) { break; }
            let prev = sort_order[k - 1u];
            if (prev <= v) { break; }
            sort_order[k] = prev;
            k = k - 1u;
        }
        sort_order[k] = v;
    }
}

@group(0) @binding(1) var<storage, read> sum_grad: array<f32>;
@group(0) @binding(2) var<storage, read> sum_order: array<u32>;
@group(0) @binding(3) var<storage, read> sum_starts: array<u32>;
@group(0) @binding(4) var<storage, read_write> grad_table: array<f32>;

@compute @workgroup_size(WG)
fn embed_sum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= ep.rows * ep.dim) { return; }
    let r = i / ep.dim;
    let d = i % ep.dim;
    var acc = 0.0;
    for (var p = sum_starts[r]; p < sum_starts[r + 1u]; p = p + 1u) {
        acc = acc + sum_grad[sum_order[p] * ep.dim + d];
    }
    grad_table[i] = acc;
}
