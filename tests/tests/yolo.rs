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
