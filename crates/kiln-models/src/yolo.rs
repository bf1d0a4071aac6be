//! YOLO's pieces that come before the network: anchor boxes from k-means over the training boxes with the
//! distance 1 - IoU (YOLOv2, Redmon & Farhadi 2017), boxes compared by size alone (as if centred together).

use kiln_graph::Rng;

/// IoU of two boxes of sizes (w, h) sharing a centre.
pub fn size_iou(a: (f32, f32), b: (f32, f32)) -> f64 {
    let inter = a.0.min(b.0) as f64 * a.1.min(b.1) as f64;
    let union = a.0 as f64 * a.1 as f64 + b.0 as f64 * b.1 as f64 - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// `k` anchors (w, h) from the box sizes `sizes` by k-means with the distance 1 - IoU: seeded k-means++
/// starts, assignment to the anchor of highest IoU, each anchor moved to the median size of its boxes (robust
/// to the odd huge box), until no assignment changes (at most 300 rounds). Sorted by area; with the mean over
/// the boxes of their best IoU with an anchor (the number YOLOv2 reports to choose k).
pub fn kmeans_anchors(sizes: &[(f32, f32)], k: usize, seed: u64) -> (Vec<(f32, f32)>, f64) {
    if sizes.is_empty() || k == 0 {
        return (Vec::new(), 0.0);
    }
    let k = k.min(sizes.len());
    let mut rng = Rng::new(seed);
    // k-means++: each next start drawn with probability proportional to its distance from the nearest start.
    let mut anchors = vec![sizes[rng.below(sizes.len())]];
    while anchors.len() < k {
        let d: Vec<f64> = sizes.iter().map(|&s| anchors.iter().map(|&a| 1.0 - size_iou(s, a)).fold(f64::INFINITY, f64::min)).collect();
        let total: f64 = d.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut r = rng.uniform() * total;
        let mut pick = sizes.len() - 1;
        for (i, &v) in d.iter().enumerate() {
            if r < v {
                pick = i;
                break;
            }
            r -= v;
        }
        anchors.push(sizes[pick]);
    }
    let nearest = |s: (f32, f32), anchors: &[(f32, f32)]| -> usize { (0..anchors.len()).max_by(|&a, &b| size_iou(s, anchors[a]).total_cmp(&size_iou(s, anchors[b]))).unwrap_or(0) };
    let mut assign = vec![usize::MAX; sizes.len()];
    for _ in 0..300 {
        let next: Vec<usize> = sizes.iter().map(|&s| nearest(s, &anchors)).collect();
        if next == assign {
            break;
        }
        assign = next;
        for (j, anchor) in anchors.iter_mut().enumerate() {
            let members: Vec<(f32, f32)> = sizes.iter().zip(&assign).filter(|(_, &a)| a == j).map(|(&s, _)| s).collect();
            if members.is_empty() {
                continue;
            }
            let median = |mut v: Vec<f32>| {
                v.sort_by(f32::total_cmp);
                v[v.len() / 2]
            };
            *anchor = (median(members.iter().map(|m| m.0).collect()), median(members.iter().map(|m| m.1).collect()));
        }
    }
    anchors.sort_by(|a, b| (a.0 * a.1).total_cmp(&(b.0 * b.1)));
    let mean_iou = sizes.iter().map(|&s| size_iou(s, anchors[nearest(s, &anchors)])).sum::<f64>() / sizes.len() as f64;
    (anchors, mean_iou)
}
