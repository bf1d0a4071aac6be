//! Detection and segmentation metrics as the field computes them, on host values: VOC average precision
//! (all-point interpolation), COCO's mAP@[.5:.95] and recall (pycocotools' `COCOeval`: 101 recall points,
//! 1 / 10 / 100 detections per image, area ranges), and for segmentation pixel accuracy and per-class IoU.
//! Boxes are (x1, y1, x2, y2) in continuous coordinates (areas without VOC's "+1" pixel).

/// One detection: the image it is in, its class, its score and box.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    pub image: usize,
    pub class: u32,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// One ground-truth object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroundTruth {
    pub image: usize,
    pub class: u32,
    pub bbox: [f32; 4],
}

fn area(b: &[f32; 4]) -> f64 {
    (b[2] - b[0]) as f64 * (b[3] - b[1]) as f64
}

/// IoU of two boxes (0 when both are empty).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) as f64;
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0) as f64;
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// The area under the precision-recall curve with all-point interpolation (the VOC devkit from 2010 on):
/// precision made non-increasing from the right, summed over the recall steps. `recall` and `precision` are
/// the cumulative values after each detection in score order.
pub fn all_point_ap(recall: &[f64], precision: &[f64]) -> f64 {
    let mut mrec = vec![0.0];
    mrec.extend_from_slice(recall);
    mrec.push(1.0);
    let mut mpre = vec![0.0];
    mpre.extend_from_slice(precision);
    mpre.push(0.0);
    for i in (1..mpre.len()).rev() {
        mpre[i - 1] = mpre[i - 1].max(mpre[i]);
    }
    (1..mrec.len()).filter(|&i| mrec[i] != mrec[i - 1]).map(|i| (mrec[i] - mrec[i - 1]) * mpre[i]).sum()
}

/// VOC average precision of one class at an IoU threshold, as the devkit's voc_eval: detections in
/// descending score (ties in the order given); each finds the object of its image (and class) it overlaps
/// most (the first of ties); above the threshold and not yet matched, a true positive that takes it; else a
/// false positive (a second detection of a matched object too). None when the class has no ground truth.
pub fn voc_ap(detections: &[Detection], truths: &[GroundTruth], class: u32, iou_threshold: f64) -> Option<f64> {
    let gts: Vec<&GroundTruth> = truths.iter().filter(|g| g.class == class).collect();
    if gts.is_empty() {
        return None;
    }
    let mut dets: Vec<&Detection> = detections.iter().filter(|d| d.class == class).collect();
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut matched = vec![false; gts.len()];
    let (mut tp, mut fp) = (0usize, 0usize);
    let (mut recall, mut precision) = (Vec::with_capacity(dets.len()), Vec::with_capacity(dets.len()));
    for d in dets {
        let best = gts.iter().enumerate().filter(|(_, g)| g.image == d.image).map(|(i, g)| (i, iou(&d.bbox, &g.bbox))).max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        match best {
            Some((i, o)) if o > iou_threshold && !matched[i] => {
                matched[i] = true;
                tp += 1;
            }
            _ => fp += 1,
        }
        recall.push(tp as f64 / gts.len() as f64);
        precision.push(tp as f64 / (tp + fp) as f64);
    }
    Some(all_point_ap(&recall, &precision))
}

/// VOC mAP at an IoU threshold: the mean of [`voc_ap`] over the classes with ground truth, and each class's AP.
pub fn voc_map(detections: &[Detection], truths: &[GroundTruth], iou_threshold: f64) -> (f64, Vec<(u32, f64)>) {
    let mut classes: Vec<u32> = truths.iter().map(|g| g.class).collect();
    classes.sort();
    classes.dedup();
    let per: Vec<(u32, f64)> = classes.iter().filter_map(|&c| voc_ap(detections, truths, c, iou_threshold).map(|ap| (c, ap))).collect();
    let map = if per.is_empty() { 0.0 } else { per.iter().map(|p| p.1).sum::<f64>() / per.len() as f64 };
    (map, per)
}

/// COCO's summary numbers (pycocotools' `COCOeval.stats`, in its order); -1 where nothing was measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CocoStats {
    /// AP at IoU .50:.05:.95, all areas, 100 detections per image: "mAP".
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
    pub ap_small: f64,
    pub ap_medium: f64,
    pub ap_large: f64,
    pub ar1: f64,
    pub ar10: f64,
    pub ar100: f64,
    pub ar_small: f64,
    pub ar_medium: f64,
    pub ar_large: f64,
}

impl CocoStats {
    pub fn as_array(&self) -> [f64; 12] {
        [self.ap, self.ap50, self.ap75, self.ap_small, self.ap_medium, self.ap_large, self.ar1, self.ar10, self.ar100, self.ar_small, self.ar_medium, self.ar_large]
    }
}

const AREAS: [(f64, f64); 4] = [(0.0, 1e10), (0.0, 32.0 * 32.0), (32.0 * 32.0, 96.0 * 96.0), (96.0 * 96.0, 1e10)];
const MAX_DETS: [usize; 3] = [1, 10, 100];

/// COCO evaluation of boxes exactly as pycocotools' `COCOeval` (iouType "bbox", no crowd objects): per image
/// and class, detections by descending score (stable), at most 100, greedily matched at each IoU threshold
/// .50:.05:.95 to the best still-unmatched object of IoU at least the threshold; objects outside an area
/// range are ignored (and detections matched to them, or unmatched and outside it); precision at the 101
/// recall points 0:.01:1 after making it non-increasing; AP the mean over thresholds, recall points and
/// classes with objects.
pub fn coco_eval(detections: &[Detection], truths: &[GroundTruth]) -> CocoStats {
    coco_eval_with(detections, truths, |d, g| iou(&detections[d].bbox, &truths[g].bbox), |d| area(&detections[d].bbox), |g| area(&truths[g].bbox))
}

/// [`coco_eval`] with the overlap and areas given (mask AP: IoU and areas of masks), by index into
/// `detections` and `truths`.
pub fn coco_eval_with(detections: &[Detection], truths: &[GroundTruth], overlap: impl Fn(usize, usize) -> f64, det_area: impl Fn(usize) -> f64, gt_area: impl Fn(usize) -> f64) -> CocoStats {
    // numpy's linspace(.5, .95, 10) and linspace(0, 1, 101) to the last bit (i * step + start, the end exact),
    // so an IoU or recall that lands on a threshold compares as in pycocotools.
    let thresholds: Vec<f64> = (0..10).map(|i| if i == 9 { 0.95 } else { i as f64 * ((0.95 - 0.5) / 9.0) + 0.5 }).collect();
    let points: Vec<f64> = (0..101).map(|i| if i == 100 { 1.0 } else { i as f64 * (1.0 / 100.0) }).collect();
    let mut images: Vec<usize> = detections.iter().map(|d| d.image).chain(truths.iter().map(|g| g.image)).collect();
    images.sort();
    images.dedup();
    let mut classes: Vec<u32> = detections.iter().map(|d| d.class).chain(truths.iter().map(|g| g.class)).collect();
    classes.sort();
    classes.dedup();
    // precision[t][r][class][area][maxdet] and recall[t][class][area][maxdet], -1 where not measured.
    let (nt, nr, nk) = (thresholds.len(), 101, classes.len());
    let mut precision = vec![-1.0; nt * nr * nk * 4 * 3];
    let mut recall = vec![-1.0; nt * nk * 4 * 3];
    // Each (image, class)'s objects and detections, in index order, found once: the loops below visit every
    // image for every class and area range, and filtering the whole data set there was quadratic in it.
    let mut groups: std::collections::HashMap<(usize, u32), (Vec<usize>, Vec<usize>)> = std::collections::HashMap::new();
    for (g, t) in truths.iter().enumerate() {
        groups.entry((t.image, t.class)).or_default().0.push(g);
    }
    for (d, det) in detections.iter().enumerate() {
        groups.entry((det.image, det.class)).or_default().1.push(d);
    }
    let no_group = (Vec::new(), Vec::new());
    let p_at = |t: usize, r: usize, k: usize, a: usize, m: usize| (((t * nr + r) * nk + k) * 4 + a) * 3 + m;
    let r_at = |t: usize, k: usize, a: usize, m: usize| ((t * nk + k) * 4 + a) * 3 + m;
    for (k, &class) in classes.iter().enumerate() {
        for (a, &(lo, hi)) in AREAS.iter().enumerate() {
            // Per image: (scores, matched per threshold, ignored per threshold) of its detections by score.
            let mut per_image = Vec::new();
            let mut positives = 0usize;
            for &img in &images {
                let (group_gts, group_dts) = groups.get(&(img, class)).unwrap_or(&no_group);
                let mut gts: Vec<usize> = group_gts.clone();
                let ignored = |g: usize| {
                    let ar = gt_area(g);
                    ar < lo || ar > hi
                };
                // Objects not ignored first (a stable sort), as pycocotools orders them.
                gts.sort_by_key(|&g| ignored(g));
                let gt_ignored: Vec<bool> = gts.iter().map(|&g| ignored(g)).collect();
                positives += gt_ignored.iter().filter(|&&i| !i).count();
                let mut dts: Vec<usize> = group_dts.clone();
                dts.sort_by(|&x, &y| detections[y].score.total_cmp(&detections[x].score));
                dts.truncate(MAX_DETS[2]);
                let mut matched = vec![vec![false; dts.len()]; nt];
                let mut dt_ignored = vec![vec![false; dts.len()]; nt];
                for (t, &thr) in thresholds.iter().enumerate() {
                    let mut gt_taken = vec![false; gts.len()];
                    for (di, &d) in dts.iter().enumerate() {
                        let mut best = thr.min(1.0 - 1e-10);
                        let mut m: Option<usize> = None;
                        for (gi, &g) in gts.iter().enumerate() {
                            if gt_taken[gi] {
                                continue;
                            }
                            // Once matched to an object that counts, stop at the ignored ones behind it.
                            if m.is_some_and(|m| !gt_ignored[m]) && gt_ignored[gi] {
                                break;
                            }
                            let o = overlap(d, g);
                            if o < best {
                                continue;
                            }
                            best = o;
                            m = Some(gi);
                        }
                        if let Some(gi) = m {
                            gt_taken[gi] = true;
                            matched[t][di] = true;
                            dt_ignored[t][di] = gt_ignored[gi];
                        } else {
                            let ar = det_area(d);
                            dt_ignored[t][di] = ar < lo || ar > hi;
                        }
                    }
                }
                let scores: Vec<f32> = dts.iter().map(|&d| detections[d].score).collect();
                per_image.push((scores, matched, dt_ignored));
            }
            if positives == 0 {
                continue;
            }
            for (m, &max_det) in MAX_DETS.iter().enumerate() {
                // Every image's first max_det detections, merged by descending score (stable: image order).
                let mut all: Vec<(f32, usize, usize)> = Vec::new();
                for (i, (scores, _, _)) in per_image.iter().enumerate() {
                    all.extend(scores.iter().take(max_det).enumerate().map(|(j, &s)| (s, i, j)));
                }
                all.sort_by(|x, y| y.0.total_cmp(&x.0));
                for t in 0..nt {
                    let (mut tp, mut fp) = (0.0f64, 0.0f64);
                    let (mut rc, mut pr) = (Vec::new(), Vec::new());
                    for &(_, i, j) in &all {
                        let (_, matched, ignored) = &per_image[i];
                        if ignored[t][j] {
                            continue;
                        }
                        if matched[t][j] {
                            tp += 1.0;
                        } else {
                            fp += 1.0;
                        }
                        rc.push(tp / positives as f64);
                        pr.push(tp / (tp + fp + f64::EPSILON));
                    }
                    recall[r_at(t, k, a, m)] = rc.last().copied().unwrap_or(0.0);
                    for i in (1..pr.len()).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &point) in points.iter().enumerate() {
                        // The first detection whose recall reaches the point (numpy's searchsorted, side left).
                        let idx = rc.partition_point(|&v| v < point);
                        precision[p_at(t, r, k, a, m)] = if idx < pr.len() { pr[idx] } else { 0.0 };
                    }
                }
            }
        }
    }
    let mean = |vals: Vec<f64>| {
        let kept: Vec<f64> = vals.into_iter().filter(|&v| v > -1.0).collect();
        if kept.is_empty() {
            -1.0
        } else {
            kept.iter().sum::<f64>() / kept.len() as f64
        }
    };
    let ap = |t: Option<usize>, a: usize| {
        let ts: Vec<usize> = t.map(|t| vec![t]).unwrap_or_else(|| (0..nt).collect());
        mean(ts.iter().flat_map(|&t| (0..nr).flat_map(move |r| (0..nk).map(move |k| (t, r, k)))).map(|(t, r, k)| precision[p_at(t, r, k, a, 2)]).collect())
    };
    let ar = |a: usize, m: usize| mean((0..nt).flat_map(|t| (0..nk).map(move |k| (t, k))).map(|(t, k)| recall[r_at(t, k, a, m)]).collect());
    CocoStats {
        ap: ap(None, 0),
        ap50: ap(Some(0), 0),
        ap75: ap(Some(5), 0),
        ap_small: ap(None, 1),
        ap_medium: ap(None, 2),
        ap_large: ap(None, 3),
        ar1: ar(0, 0),
        ar10: ar(0, 1),
        ar100: ar(0, 2),
        ar_small: ar(1, 2),
        ar_medium: ar(2, 2),
        ar_large: ar(3, 2),
    }
}

/// Segmentation scores from a confusion matrix [true][predicted] over pixels: (pixel accuracy, IoU per class
/// (None for a class absent from both labels and predictions), mean IoU over the classes present).
pub fn segmentation_scores(confusion: &[Vec<u64>]) -> (f64, Vec<Option<f64>>, f64) {
    let k = confusion.len();
    // A ragged matrix reads its missing entries as 0.
    let at = |r: usize, c: usize| confusion.get(r).and_then(|row| row.get(c)).copied().unwrap_or(0);
    let total: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..k).map(|i| at(i, i)).sum();
    let ious: Vec<Option<f64>> = (0..k)
        .map(|c| {
            let tp = at(c, c);
            let fn_: u64 = (0..k).map(|j| at(c, j)).sum::<u64>() - tp;
            let fp: u64 = (0..k).map(|r| at(r, c)).sum::<u64>() - tp;
            let union = tp + fn_ + fp;
            (union > 0).then(|| tp as f64 / union as f64)
        })
        .collect();
    let present: Vec<f64> = ious.iter().flatten().copied().collect();
    let miou = if present.is_empty() { 0.0 } else { present.iter().sum::<f64>() / present.len() as f64 };
    (if total > 0 { correct as f64 / total as f64 } else { 0.0 }, ious, miou)
}
