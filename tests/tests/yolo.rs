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

/// YOLOv1's loss (Redmon et al. 2016, eq. 3) in f64, with the responsible boxes and their IoU targets given.
fn v1_loss_reference(raw: &[f64], targets: &[Vec<f32>], (n, s, b, c): (usize, usize, usize, usize), resp: &[(usize, f64)]) -> f64 {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let width = 5 * b + c;
    // raw is [n, width, s, s]: channel k of cell (i, row, col).
    let at = |i: usize, k: usize, cell: usize| raw[(i * width + k) * s * s + cell];
    let mut total = 0.0;
    for i in 0..n {
        for cell in 0..s * s {
            let t = &targets[i][cell * (5 + c)..(cell + 1) * (5 + c)];
            let responsible = (t[0] > 0.0).then(|| resp[i * s * s + cell]);
            for j in 0..b {
                let conf = sig(at(i, 5 * j + 4, cell));
                match responsible {
                    Some((r, iou)) if r == j => {
                        let (tx, ty, tw, th) = (t[1] as f64, t[2] as f64, t[4] as f64, t[3] as f64);
                        total += 5.0
                            * ((sig(at(i, 5 * j, cell)) - tx).powi(2)
                                + (sig(at(i, 5 * j + 1, cell)) - ty).powi(2)
                                + (at(i, 5 * j + 2, cell) - tw.sqrt()).powi(2)
                                + (at(i, 5 * j + 3, cell) - th.sqrt()).powi(2));
                        total += (conf - iou).powi(2);
                    }
                    _ => total += 0.5 * conf * conf,
                }
            }
            if t[0] > 0.0 {
                let z: f64 = (0..c).map(|k| at(i, 5 * b + k, cell).exp()).sum();
                total += (0..c).map(|k| (at(i, 5 * b + k, cell).exp() / z - t[5 + k] as f64).powi(2)).sum::<f64>();
            }
        }
    }
    total / n as f64
}

#[test]
fn yolo_v1_loss_equals_the_papers_formula_and_its_gradient() {
    use kiln_graph::Tensor;
    use kiln_models::yolo::{encode_v1, v1_iou, Yolo, YoloLayout};
    kiln_tests::require_gpu();
    let mut rng = test_rng("yolo_v1_loss");
    let (n, s, b, c, side) = (2, 3, 2, 4, 48);
    let width = 5 * b + c;
    let mut vs = kiln_nn::VarStore::new(1);
    let model = Yolo::new(&mut vs, YoloLayout::V1 { boxes: b }, c, 4).unwrap();
    vs.finish().unwrap();
    let mut raw: Vec<f32> = (0..n * width * s * s).map(|_| rng.range(-1.5, 1.5) as f32).collect();
    // Two or three objects an image (image 1 has two in one cell: the larger is the target).
    let targets: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let mut boxes: Vec<[f32; 4]> = (0..2 + i)
                .map(|_| {
                    let (x, y) = (rng.range(0.0, 36.0) as f32, rng.range(0.0, 36.0) as f32);
                    [x, y, x + rng.range(4.0, 12.0) as f32, y + rng.range(4.0, 12.0) as f32]
                })
                .collect();
            if i == 1 {
                boxes.push([boxes[0][0] + 1.0, boxes[0][1] + 1.0, boxes[0][2] - 1.0, boxes[0][3] - 1.0]);
            }
            let labels: Vec<u32> = boxes.iter().map(|_| rng.below(c) as u32).collect();
            encode_v1(&boxes, &labels, (side, side), s, c)
        })
        .collect();
    // In image 0's first object cell, box 1 predicts the object exactly: it must be the responsible one.
    let first = (0..s * s).find(|&cell| targets[0][cell * (5 + c)] > 0.0).unwrap();
    let t = &targets[0][first * (5 + c)..];
    let logit = |p: f32| (p.clamp(0.01, 0.99) / (1.0 - p.clamp(0.01, 0.99))).ln();
    for (k, v) in [(5, logit(t[1])), (6, logit(t[2])), (7, t[4].sqrt()), (8, t[3].sqrt())] {
        raw[k * s * s + first] = v;
    }
    // The responsible box of each object cell, by IoU of the decoded predictions (cell units), as the paper.
    let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
    let at = |i: usize, k: usize, cell: usize| raw[(i * width + k) * s * s + cell];
    let resp: Vec<(usize, f64)> = (0..n * s * s)
        .map(|ic| {
            let (i, cell) = (ic / (s * s), ic % (s * s));
            let t = &targets[i][cell * (5 + c)..(cell + 1) * (5 + c)];
            let truth = [t[1], t[2], t[4], t[3]];
            let ious: Vec<f32> =
                (0..b).map(|j| v1_iou(&[sig(at(i, 5 * j, cell)), sig(at(i, 5 * j + 1, cell)), at(i, 5 * j + 2, cell).max(0.0).powi(2), at(i, 5 * j + 3, cell).max(0.0).powi(2)], &truth)).collect();
            let best = if ious[1] > ious[0] { 1 } else { 0 };
            (best, ious[best] as f64)
        })
        .collect();
    assert!(resp[first].0 == 1 && resp[first].1 > 0.9, "{:?}", resp[first]);
    let pt = Tensor::from_slice(&raw, &[n, width, s, s]).unwrap().var();
    let l = model.loss_v1(&pt, &targets, 5.0, 0.5).unwrap();
    let raw64: Vec<f64> = raw.iter().map(|&v| v as f64).collect();
    let dims = (n, s, b, c);
    let want = v1_loss_reference(&raw64, &targets, dims, &resp);
    kiln_tests::assert_close("YOLOv1 loss", &l.to_vec().unwrap(), &[want], 1e-5);
    // The gradient against central differences of the reference (responsibilities and IoU targets held).
    let eps = 1e-5;
    let grad: Vec<f64> = (0..raw64.len())
        .map(|k| {
            let (mut up, mut down) = (raw64.clone(), raw64.clone());
            up[k] += eps;
            down[k] -= eps;
            (v1_loss_reference(&up, &targets, dims, &resp) - v1_loss_reference(&down, &targets, dims, &resp)) / (2.0 * eps)
        })
        .collect();
    kiln_tests::assert_close("YOLOv1 loss gradient", &l.backward().unwrap().get(&pt).unwrap().to_vec().unwrap(), &grad, 1e-3);
    // Targets of the wrong size, and the anchor form's loss on this head, are errors.
    assert!(model.loss_v1(&pt, &targets[..1], 5.0, 0.5).is_err());
    assert!(model.loss(&pt, &[], 5.0, 0.5).is_err());
}

#[test]
fn yolo_v1_decodes_a_box_as_placed() {
    use kiln_graph::Tensor;
    use kiln_models::yolo::{Yolo, YoloLayout};
    kiln_tests::require_gpu();
    let (s, b, c) = (3, 2, 3);
    let width = 5 * b + c;
    let mut vs = kiln_nn::VarStore::new(1);
    let model = Yolo::new(&mut vs, YoloLayout::V1 { boxes: b }, c, 4).unwrap();
    vs.finish().unwrap();
    // Every confidence low but box 1 of cell (row 1, column 2): centre at (0.5, 0.25) of the cell, 1.5 x 1
    // cells, class 2. On a 48-pixel image (16-pixel cells) that is the box (28, 12)-(52, 28).
    let mut raw = vec![-10f32; width * s * s];
    let cell = s + 2;
    let logit = |p: f32| (p / (1.0 - p)).ln();
    for (k, v) in [(5, 0.0), (6, logit(0.25)), (7, 1.5f32.sqrt()), (8, 1.0), (9, 3.0), (12, 4.0)] {
        raw[k * s * s + cell] = v;
    }
    let pred = Tensor::from_slice(&raw, &[1, width, s, s]).unwrap();
    let found = model.detect(&pred, 0, 48, 0.3, 0.5).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let p2 = (4f32.exp() / (4f32.exp() + 2.0 * (-10f32).exp())) / (1.0 + (-3f32).exp());
    assert_eq!(found[0].class, 2);
    assert!((found[0].score - p2).abs() < 1e-5, "score {} against {p2}", found[0].score);
    for (got, want) in found[0].bbox.iter().zip([28.0, 12.0, 52.0, 28.0]) {
        assert!((got - want).abs() < 1e-4, "{:?}", found[0].bbox);
    }
}

#[test]
fn a_short_yolo_v1_run_learns_to_find_objects() {
    use kiln_data::{ObjectSceneConfig, ObjectSource};
    use kiln_models::yolo::{train_yolo, YoloConfig};
    kiln_tests::require_gpu();
    let scenes = ObjectSceneConfig { size: 64, objects: (1, 3), scale: (0.7, 1.4), source: ObjectSource::Digits, ..Default::default() };
    // Plain convolutions here (batch norm is the default, trained in the test above and below).
    let cfg = YoloConfig { scenes, v1_boxes: Some(2), width: 8, batch_norm: false, batch_size: 16, steps: 120, lr: 3e-3, test_scenes: 64, ..Default::default() };
    let (model, r) = train_yolo(&cfg, |_, _| {}).expect("training");
    eprintln!("yolo v1, 120 steps: loss {:.3} -> {:.3}, mAP@0.5 {:.3}, COCO mAP {:.3}, {:.0} ms/step", r.first_loss, r.last_loss, r.map50, r.coco_map, r.ms_per_step);
    assert_eq!((r.layout.as_str(), model.anchors().len()), ("v1 (2 boxes a cell)", 0));
    assert!(r.last_loss < 0.5 * r.first_loss, "loss {} -> {}", r.first_loss, r.last_loss);
}

#[test]
fn a_batch_norm_yolo_trains_saves_and_loads_in_evaluation_mode() {
    use kiln_data::ObjectSource;
    use kiln_models::yolo::{load_yolo, train_yolo, Yolo, YoloConfig, YoloLayout};
    kiln_tests::require_gpu();
    // Built with batch norm: a norm after every backbone convolution, which then has no bias; without it, the
    // names and shapes of the plain backbone.
    let (mut with, mut without) = (kiln_nn::VarStore::new(1), kiln_nn::VarStore::new(1));
    let bn = Yolo::with_batch_norm(&mut with, YoloLayout::Anchors(vec![(10.0, 10.0)]), 3, 4, true).unwrap();
    let plain = Yolo::new(&mut without, YoloLayout::Anchors(vec![(10.0, 10.0)]), 3, 4).unwrap();
    assert!(bn.batch_norm() && !plain.batch_norm());
    let names = |vs: &kiln_nn::VarStore| vs.params().map(|p| p.name().to_string()).collect::<Vec<_>>();
    let (bn_names, plain_names) = (names(&with), names(&without));
    for i in 0..5 {
        assert!(bn_names.contains(&format!("backbone.{i}.bn.weight")) && !bn_names.contains(&format!("backbone.{i}.bias")), "{bn_names:?}");
        assert!(plain_names.contains(&format!("backbone.{i}.bias")) && !plain_names.iter().any(|n| n.contains(".bn.")), "{plain_names:?}");
    }
    // A short run: the loss falls; the checkpoint says batch norm and loads in evaluation mode, so one picture
    // gives the trained net's outputs whatever else is in its batch.
    let dir = std::env::temp_dir().join(format!("kiln-yolo-bn-{}", std::process::id()));
    let scenes = ObjectSceneConfig { size: 64, objects: (1, 3), scale: (0.7, 1.4), source: ObjectSource::Digits, ..Default::default() };
    let cfg = YoloConfig { scenes, anchors: 3, width: 8, batch_norm: true, batch_size: 16, steps: 60, lr: 3e-3, test_scenes: 16, out_dir: Some(dir.clone()), ..Default::default() };
    let (model, r) = train_yolo(&cfg, |_, _| {}).expect("training");
    assert!(r.last_loss < 0.5 * r.first_loss, "loss {} -> {}", r.first_loss, r.last_loss);
    let (loaded, info) = load_yolo(&dir.join("yolo.safetensors")).expect("loading");
    assert!(loaded.batch_norm() && info.size == 64);
    kiln_tests::assert_loaded_matches_trained("the loaded YOLO's outputs", 64, |x| model.forward(x), |x| loaded.forward(x));
    std::fs::remove_dir_all(&dir).ok();
}
