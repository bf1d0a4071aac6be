// ---- Non-maximum suppression (torchvision.ops.nms and batched_nms), greedy, on the GPU:
//   nms_rank   rank[i] (+)= boxes ahead of box i among j in [j_begin, j_end): candidates (score above the
//              threshold, not NaN) by score descending, ties by index (torchvision's stable sort), then the
//              rest by index                                                                   scores: [n]
//   nms_order  order[rank[i]] = i, and keep[i] = n (what keep[] holds past the count)
//   nms_mask   for sorted positions r in [block_begin, block_begin + block_len) and words w: bit b of
//              mask[r - block_begin, w] says box order[32 w + b] (a later position) overlaps box order[r]
//              beyond the IoU threshold (and is of its class, per class)          boxes: [n, 4] (x1, y1, x2, y2)
//   nms_scan   one workgroup walks the block in order: a candidate no kept box suppressed is kept (its index
//              appended to keep[], count[0] incremented, at most max_keep) and its mask row ORed into the
//              removed bits of the later positions                                removed: [words] (sorted positions)
// The rank's j range and the blocks keep each invocation's loops under lavapipe's 65,535 iterations.
struct NmsParams {
    n: u32, words: u32, block_begin: u32, block_len: u32,
    iou: f32, score: f32, max_keep: u32, inclusive: u32,
    j_begin: u32, j_end: u32, per_class: u32, has_score: u32,
}

@group(0) @binding(0) var<uniform> np: NmsParams;

@group(0) @binding(1) var<storage, read> nr_scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> nr_rank: array<u32>;

fn candidate(s: f32) -> bool {
    // False for NaN (s == s); without a threshold every other score, -inf included, as torchvision.
    return s == s && (np.has_score == 0u || s > np.score);
}

// Whether box a comes before box b in the order.
fn ahead(a: u32, b: u32, sa: f32, sb: f32) -> bool {
    let ca = candidate(sa);
    let cb = candidate(sb);
    if (ca != cb) { return ca; }
    if (ca && sa != sb) { return sa > sb; }
    return a < b;
}

@compute @workgroup_size(256)
fn nms_rank(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= np.n) { return; }
    let si = nr_scores[i];
    var r = select(nr_rank[i], 0u, np.j_begin == 0u);
    for (var j = np.j_begin; j < np.j_end; j = j + 1u) {
        if (j != i && ahead(j, i, nr_scores[j], si)) { r = r + 1u; }
    }
    nr_rank[i] = r;
}

@group(0) @binding(1) var<storage, read> no_rank: array<u32>;
@group(0) @binding(2) var<storage, read_write> no_order: array<u32>;
@group(0) @binding(3) var<storage, read_write> no_keep: array<u32>;

@compute @workgroup_size(256)
fn nms_order(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= np.n) { return; }
    no_order[no_rank[i]] = i;
    no_keep[i] = np.n;
}

@group(0) @binding(1) var<storage, read> nm_boxes: array<f32>;
@group(0) @binding(2) var<storage, read> nm_order: array<u32>;
@group(0) @binding(3) var<storage, read> nm_classes: array<u32>;
@group(0) @binding(4) var<storage, read_write> nm_mask: array<u32>;

fn iou_of(a: u32, b: u32) -> f32 {
    let ax1 = nm_boxes[4u * a]; let ay1 = nm_boxes[4u * a + 1u]; let ax2 = nm_boxes[4u * a + 2u]; let ay2 = nm_boxes[4u * a + 3u];
    let bx1 = nm_boxes[4u * b]; let by1 = nm_boxes[4u * b + 1u]; let bx2 = nm_boxes[4u * b + 2u]; let by2 = nm_boxes[4u * b + 3u];
    let inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0);
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter);
}

@compute @workgroup_size(256)
fn nms_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;
    if (t >= np.block_len * np.words) { return; }
    let w = t % np.words;
    let r = np.block_begin + t / np.words;
    let a = nm_order[r];
    var bits = 0u;
    for (var b = 0u; b < 32u; b = b + 1u) {
        let j = 32u * w + b;
        if (j > r && j < np.n) {
            let o = nm_order[j];
            if (np.per_class == 0u || nm_classes[o] == nm_classes[a]) {
                let v = iou_of(a, o);
                // NaN (a box of NaN coordinates, or two empty boxes) suppresses nothing.
                if (v > np.iou || (np.inclusive != 0u && v == np.iou)) { bits = bits | (1u << b); }
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
