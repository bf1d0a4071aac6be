//! YOLO's anchors: k-means with the distance 1 - IoU finds clusters of box sizes, and more anchors fit the
//! detection scenes' boxes better.

use kiln_data::{ObjectSceneConfig, ObjectScenes, ObjectSplit};
use kiln_models::yolo::{kmeans_anchors, size_iou};
use kiln_tests::test_rng;

#[test]
fn kmeans_with_iou_distance_finds_the_size_clusters() {
    assert!((size_iou((10.0, 10.0), (20.0, 5.0)) - 50.0 / 150.0).abs() < 1e-12, "10 x 5 shared of 100 + 100 - 50");
    let mut rng = test_rng("kmeans_anchors");
    let centres = [(10.0f32, 10.0f32), (40.0, 20.0), (20.0, 60.0)];
    let sizes: Vec<(f32, f32)> = (0..300)
        .map(|i| {
            let (w, h) = centres[i % 3];
            (w * rng.range(0.9, 1.1) as f32, h * rng.range(0.9, 1.1) as f32)
        })
        .collect();
    let seed = rng.next_u64();
    let (anchors, mean_iou) = kmeans_anchors(&sizes, 3, seed);
    assert_eq!(kmeans_anchors(&sizes, 3, seed).0, anchors, "the same seed, the same anchors");
    // Sorted by area: 10 x 10, 40 x 20, 20 x 60.
    for (a, c) in anchors.iter().zip(centres) {
        assert!((a.0 / c.0 - 1.0).abs() < 0.1 && (a.1 / c.1 - 1.0).abs() < 0.1, "anchor {a:?} for cluster {c:?} ({anchors:?})");
    }
    assert!(mean_iou > 0.8, "mean IoU {mean_iou}");
    let (one, iou1) = kmeans_anchors(&sizes, 1, seed);
    assert_eq!(one.len(), 1);
    assert!(iou1 < mean_iou - 0.2, "one anchor {iou1} against three {mean_iou}");
}

#[test]
fn more_anchors_fit_the_scene_boxes_better() {
    let scenes = ObjectScenes::new(ObjectSceneConfig::default(), ObjectSplit::Train, 42, 150, None).unwrap();
    let sizes: Vec<(f32, f32)> = (0..scenes.len).flat_map(|i| scenes.scene(i).unwrap().objects.into_iter().map(|o| (o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]))).collect();
    let fits: Vec<f64> = [1, 3, 5, 9].iter().map(|&k| kmeans_anchors(&sizes, k, 7).1).collect();
    eprintln!("mean best IoU with 1, 3, 5, 9 anchors on {} scene boxes: {fits:?}", sizes.len());
    assert!(fits.windows(2).all(|w| w[1] > w[0]) && fits[3] > 0.6, "{fits:?}");
}

#[test]
fn the_courses_toy_case_encodes_as_worked_out() {
    use kiln_models::yolo::{encode_anchors, encode_v1};
    // A 100 x 100 image, a 3 x 3 grid (cells of 33.3 pixels), classes (pedestrian, car, motorcycle). A car
    // from (70, 40) to (90, 70): centre (80, 55), so row 1 (55 / 33.3 = 1.65) and column 2 (80 / 33.3 = 2.4);
    // b_x = 0.4, b_y = 0.65 within the cell, b_h = 30 / 33.3 = 0.9 and b_w = 20 / 33.3 = 0.6 cells.
    let y = encode_v1(&[[70.0, 40.0, 90.0, 70.0]], &[1], (100, 100), 3, 3);
    assert_eq!(y.len(), 3 * 3 * 8, "3 x 3 x 8");
    let cell = &y[(3 + 2) * 8..(3 + 3) * 8];
    let want = [1.0, 0.4, 0.65, 0.9, 0.6, 0.0, 1.0, 0.0];
    assert!(cell.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5), "{cell:?}");
    assert_eq!(y.iter().enumerate().filter(|(i, _)| i % 8 == 0).map(|(_, v)| *v).sum::<f32>(), 1.0, "one cell holds an object");
    // Two centres in one cell: the larger object is the target.
    let y = encode_v1(&[[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 30.0, 30.0]], &[0, 2], (100, 100), 3, 3);
    assert_eq!(&y[5..8], &[0.0, 0.0, 1.0]);
    // The anchor form: the anchor of the closest size in the centre's cell, log size ratios.
    let t = encode_anchors(&[[70.0, 40.0, 90.0, 70.0]], &[1], (100, 100), 3, &[(10.0, 10.0), (20.0, 30.0), (60.0, 40.0)]);
    let at = (3 + 2) * 3 + 1;
    assert_eq!((t.object.iter().sum::<f32>(), t.object[at], t.classes[at]), (1.0, 1.0, 1));
    assert!(t.boxes[4 * at..4 * at + 4].iter().zip([0.4, 0.65, 0.0, 0.0]).all(|(a, b)| (a - b).abs() < 1e-5), "{:?}", &t.boxes[4 * at..4 * at + 4]);
}

#[test]
fn a_short_yolo_run_learns_to_find_objects() {
    use kiln_data::{ObjectSceneConfig, ObjectSource};
    use kiln_models::yolo::{train_yolo, YoloConfig};
    kiln_tests::require_gpu();
    // Small scenes (64 x 64, 1-3 digits at 0.7-1.4x) and a narrow network, for the test's budget.
    let scenes = ObjectSceneConfig { size: 64, objects: (1, 3), scale: (0.7, 1.4), source: ObjectSource::Digits, ..Default::default() };
    let cfg = YoloConfig { scenes, anchors: 3, width: 8, batch_size: 16, steps: 120, lr: 3e-3, test_scenes: 64, ..Default::default() };
    let (_, r) = train_yolo(&cfg, |_, _| {}).expect("training");
    eprintln!("yolo, 120 steps: loss {:.3} -> {:.3}, mAP@0.5 {:.3}, COCO mAP {:.3}, {:.0} ms/step, anchors {:?}", r.first_loss, r.last_loss, r.map50, r.coco_map, r.ms_per_step, r.anchors);
    assert!(r.last_loss < 0.5 * r.first_loss, "loss {} -> {}", r.first_loss, r.last_loss);
}
