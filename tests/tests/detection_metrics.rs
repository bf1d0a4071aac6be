//! Detection and segmentation metrics: VOC AP and COCO's numbers on hand-worked cases, and COCO's against
//! pycocotools' COCOeval on seeded random scenes (tests/data/coco_reference.json, written by
//! scripts/coco_reference.py).

use kiln_nn::detection_metrics::{all_point_ap, coco_eval, segmentation_scores, voc_ap, voc_map, Detection, GroundTruth};

fn det(image: usize, class: u32, score: f32, bbox: [f32; 4]) -> Detection {
    Detection { image, class, score, bbox }
}

fn gt(image: usize, class: u32, bbox: [f32; 4]) -> GroundTruth {
    GroundTruth { image, class, bbox }
}

#[test]
fn voc_average_precision_on_a_hand_worked_case() {
    // Three objects in two images; five detections by descending score:
    //   0.9 image 0, on A exactly            -> TP   recall 1/3, precision 1
    //   0.8 image 0, on A again (IoU 0.81)   -> FP   (A is taken)   1/3, 1/2
    //   0.7 image 1, on nothing              -> FP                  1/3, 1/3
    //   0.6 image 1, on C (IoU 0.9)          -> TP                  2/3, 1/2
    //   0.5 image 0, on B (IoU 0.6)          -> TP                  1,   3/5
    // Precision made non-increasing from the right: 1 up to recall 1/3, then 3/5; AP = 1/3 * 1 + 2/3 * 3/5.
    let truths = [gt(0, 0, [0., 0., 10., 10.]), gt(0, 0, [20., 20., 30., 30.]), gt(1, 0, [0., 0., 10., 10.]), gt(1, 2, [5., 5., 9., 9.])];
    let dets = [
        det(0, 0, 0.8, [1., 1., 10., 10.]),
        det(1, 0, 0.7, [50., 50., 60., 60.]),
        det(0, 0, 0.9, [0., 0., 10., 10.]),
        det(0, 0, 0.5, [20., 20., 30., 26.]),
        det(1, 0, 0.6, [0., 0., 10., 9.]),
        det(1, 1, 0.9, [0., 0., 10., 10.]),
    ];
    let ap = voc_ap(&dets, &truths, 0, 0.5).unwrap();
    assert!((ap - (1.0 / 3.0 + 2.0 / 3.0 * 0.6)).abs() < 1e-12, "AP {ap}");
    // At IoU 0.85 only the exact match and C count: TP, FP, FP, TP, FP.
    let strict = voc_ap(&dets, &truths, 0, 0.85).unwrap();
    let want = all_point_ap(&[1. / 3., 1. / 3., 1. / 3., 2. / 3., 2. / 3.], &[1., 0.5, 1. / 3., 0.5, 0.4]);
    assert!((strict - want).abs() < 1e-12 && (want - (1.0 / 3.0 + 1.0 / 3.0 * 0.5)).abs() < 1e-12, "{strict} {want}");
    // Class 1 has no objects (no AP); class 2 has one and no detection (AP 0); the mean is over classes 0 and 2.
    assert_eq!(voc_ap(&dets, &truths, 1, 0.5), None);
    let (map, per) = voc_map(&dets, &truths, 0.5);
    assert_eq!(per.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 2]);
    assert!((map - ap / 2.0).abs() < 1e-12, "{map}");
}

#[test]
fn coco_numbers_on_a_hand_worked_case() {
    // One small object found exactly, once: every AP and AR that has objects is 1; medium and large have none.
    let s = coco_eval(&[det(3, 1, 0.5, [0., 0., 10., 10.])], &[gt(3, 1, [0., 0., 10., 10.])]);
    // (Precision is tp / (tp + fp + eps), as pycocotools divides: 1 - 2e-16.)
    let want = [1., 1., 1., 1., -1., -1., 1., 1., 1., 1., -1., -1.];
    assert!(s.as_array().iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12), "{s:?}");
    // The same object found with IoU 0.64: a match at thresholds .50 to .60 only (3 of 10), so AP = AR = 0.3;
    // AP50 is 1 and AP75 is 0 (pycocotools gives the same numbers).
    let s = coco_eval(&[det(0, 1, 0.5, [0., 0., 8., 8.])], &[gt(0, 1, [0., 0., 10., 10.])]);
    assert!((s.ap - 0.3).abs() < 1e-12 && (s.ap50 - 1.0).abs() < 1e-12 && s.ap75 == 0.0 && (s.ar100 - 0.3).abs() < 1e-12, "{s:?}");
}

#[test]
fn coco_evaluation_equals_pycocotools() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/coco_reference.json")).expect("tests/data/coco_reference.json");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let num = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
        let truths: Vec<GroundTruth> =
            case["truths"].as_array().unwrap().iter().map(|g| gt(g[0].as_u64().unwrap() as usize, g[1].as_u64().unwrap() as u32, [num(&g[2]), num(&g[3]), num(&g[4]), num(&g[5])])).collect();
        let dets: Vec<Detection> = case["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| det(d[0].as_u64().unwrap() as usize, d[1].as_u64().unwrap() as u32, num(&d[2]), [num(&d[3]), num(&d[4]), num(&d[5]), num(&d[6])]))
            .collect();
        let want: Vec<f64> = case["stats"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = coco_eval(&dets, &truths).as_array();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-9, "seed {}: stat {i} is {g}, pycocotools says {w}\n{got:?}\n{want:?}", case["seed"]);
        }
    }
}

#[test]
fn segmentation_scores_on_a_hand_worked_case() {
    // Rows are the true classes, columns the predicted; class 2 appears nowhere.
    let confusion = vec![vec![3, 1, 0], vec![0, 2, 0], vec![0, 0, 0]];
    let (acc, ious, miou) = segmentation_scores(&confusion);
    assert!((acc - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(ious, vec![Some(0.75), Some(2.0 / 3.0), None]);
    assert!((miou - (0.75 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
}
