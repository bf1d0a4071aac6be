// ---- Non-maximum suppression (torchvision.ops.nms and batched_nms), greedy, on the GPU:
//   nms_sort_init  key[p] = an orderable u32 of box p's score (0 for a box that is no candidate: NaN, or
//                  at or under the threshold), order[p] = p, keep[p] = n (what keep[] holds past the count);
//                  positions p in [n, sort_len) are padding (key 0, index 0xffffffff: last)
//                                                               scores: [n] -> key, order: [sort_len]
//   nms_sort_step  one compare-exchange stage (sort_k, sort_j) of a bitonic sort of (key, order) pairs:
//                  candidates by score descending, ties by index (torchvision's stable sort), then the rest
//                  by index. log2(sort_len) (log2(sort_len) + 1) / 2 stages, sort_len / 2 invocations each
//   nms_gather the boxes (and classes) in sorted order                 boxes: [n, 4] (x1, y1, x2, y2) -> [n] vec4
//   nms_mask   for sorted positions r in [block_begin, block_begin + block_len) and words w: bit b of
//              mask[r - block_begin, w] says the candidate at 32 w + b (a later position) overlaps the one at r
//              beyond the IoU threshold (and is of its class, per class)
//   nms_scan   one workgroup walks the block in order: a candidate no kept box suppressed is kept (its index
//              appended to keep[], count[0] incremented, at most max_keep) and its mask row ORed into the
//              removed bits of the later positions                                removed: [words] (sorted positions)
// The blocks keep each invocation's loops under lavapipe's 65,535 iterations; the sort has no loops.
struct NmsParams {
    n: u32, words: u32, block_begin: u32, block_len: u32,
    iou: f32, score: f32, max_keep: u32, inclusive: u32,
    sort_k: u32, sort_j: u32, per_class: u32, has_score: u32,
    sort_len: u32, pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<uniform> np: NmsParams;

fn candidate(s: f32) -> bool {
    // False for NaN (s == s); without a threshold every other score, -inf included, as torchvision.
    return s == s && (np.has_score == 0u || s > np.score);
}

// A candidate's score as a u32 whose order is the scores' (above 0, the rest's key); -0 counts as +0.
fn sort_key(s: f32) -> u32 {
    if (!candidate(s)) { return 0u; }
    let bits = bitcast<u32>(select(s, 0.0, s == 0.0));
    return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

@group(0) @binding(1) var<storage, read> ni_scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> ni_key: array<u32>;
@group(0) @binding(3) var<storage, read_write> ni_order: array<u32>;
@group(0) @binding(4) var<storage, read_write> ni_keep: array<u32>;

@compute @workgroup_size(256)
fn nms_sort_init(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let p = gid.x + gid.y * nwg.x * 256u;
    if (p >= np.sort_len) { return; }
    if (p < np.n) {
        ni_key[p] = sort_key(ni_scores[p]);
        ni_order[p] = p;
        ni_keep[p] = np.n;
    } else {
        ni_key[p] = 0u;
        ni_order[p] = 0xffffffffu;
    }
}

@group(0) @binding(1) var<storage, read_write> nb_key: array<u32>;
@group(0) @binding(2) var<storage, read_write> nb_order: array<u32>;

@compute @workgroup_size(256)
fn nms_sort_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;
    if (t >= np.sort_len / 2u) { return; }
    let j = np.sort_j;
    let lo = 2u * j * (t / j) + t % j;
    let hi = lo + j;
    let k_lo = nb_key[lo];
    let k_hi = nb_key[hi];
    let o_lo = nb_order[lo];
    let o_hi = nb_order[hi];
    // Whether the pair at hi belongs ahead of the one at lo: the higher key, on equal keys the lower index.
    let hi_first = k_hi > k_lo || (k_hi == k_lo && o_hi < o_lo);
    // Blocks of sort_k alternate direction until the last merge, which is all one way.
    let forward = (lo & np.sort_k) == 0u;
    if (hi_first == forward) {
        nb_key[lo] = k_hi;
        nb_key[hi] = k_lo;
        nb_order[lo] = o_hi;
        nb_order[hi] = o_lo;
    }
}

@group(0) @binding(1) var<storage, read> ng_boxes: array<f32>;
@group(0) @binding(2) var<storage, read> ng_order: array<u32>;
@group(0) @binding(3) var<storage, read> ng_classes: array<u32>;
@group(0) @binding(4) var<storage, read_write> ng_sorted_boxes: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> ng_sorted_classes: array<u32>;

// sorted_boxes[r] = boxes[order[r]] (and per class, sorted_classes[r] = classes[order[r]]), r < n: the mask
// then reads each pair's boxes as two contiguous vec4 loads.
@compute @workgroup_size(256)
fn nms_gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 256u;
    if (r >= np.n) { return; }
    let o = ng_order[r];
    ng_sorted_boxes[r] = vec4<f32>(ng_boxes[4u * o], ng_boxes[4u * o + 1u], ng_boxes[4u * o + 2u], ng_boxes[4u * o + 3u]);
    if (np.per_class != 0u) { ng_sorted_classes[r] = ng_classes[o]; }
}

@group(0) @binding(1) var<storage, read> nm_boxes: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> nm_classes: array<u32>;
@group(0) @binding(3) var<storage, read> nm_key: array<u32>;
@group(0) @binding(4) var<storage, read_write> nm_mask: array<u32>;

@compute @workgroup_size(256)
fn nms_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;
    if (t >= np.block_len * np.words) { return; }
    let w = t % np.words;
    let r = np.block_begin + t / np.words;
    var bits = 0u;
    // Only later positions, and only candidates (key above 0; they come first): no other box is ever kept.
    if (nm_key[r] != 0u) {
        let a = nm_boxes[r];
        let area_a = (a.z - a.x) * (a.w - a.y);
        var class_a = 0u;
        if (np.per_class != 0u) { class_a = nm_classes[r]; }
        for (var j = max(32u * w, r + 1u); j < min(32u * w + 32u, np.n); j = j + 1u) {
            if (nm_key[j] == 0u) { break; }
            if (np.per_class == 0u || nm_classes[j] == class_a) {
                let b = nm_boxes[j];
                let inter = max(min(a.z, b.z) - max(a.x, b.x), 0.0) * max(min(a.w, b.w) - max(a.y, b.y), 0.0);
                let v = inter / (area_a + (b.z - b.x) * (b.w - b.y) - inter);
                // NaN (a box of NaN coordinates, or two empty boxes) suppresses nothing.
                if (v > np.iou || (np.inclusive != 0u && v == np.iou)) { bits = bits | (1u << (j - 32u * w)); }
            }
        }
    }
    nm_mask[t] = bits;
}

@group(0) @binding(1) var<storage, read> ns_scores: array<f32>;
@group(0) @binding(2) var<storage, read> ns_order: array<u32>;
@group(0) @binding(3) var<storage, read> ns_mask: array<u32>;
@group(0) @binding(4) var<storage, read_write> ns_removed: array<u32>;
@group(0) @binding(5) var<storage, read_write> ns_keep: array<u32>;
@group(0) @binding(6) var<storage, read_write> ns_count: array<u32>;

var<workgroup> ns_decision: u32;

@compute @workgroup_size(256)
fn nms_scan(@builtin(local_invocation_id) lid: vec3<u32>) {
    for (var r = 0u; r < np.block_len; r = r + 1u) {
        let pos = np.block_begin + r;
        if (lid.x == 0u) {
            let o = ns_order[pos];
            let removed = (ns_removed[pos / 32u] >> (pos % 32u)) & 1u;
            let keep = removed == 0u && candidate(ns_scores[o]) && ns_count[0] < np.max_keep;
            if (keep) {
                ns_keep[ns_count[0]] = o;
                ns_count[0] = ns_count[0] + 1u;
            }
            ns_decision = select(0u, 1u, keep);
        }
        let keep = workgroupUniformLoad(&ns_decision);
        if (keep != 0u) {
            for (var w = lid.x; w < np.words; w = w + 256u) {
                ns_removed[w] = ns_removed[w] | ns_mask[r * np.words + w];
            }
        }
        storageBarrier();
        workgroupBarrier();
    }
}
