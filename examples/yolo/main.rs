//! YOLO on scenes of real objects (kiln_models::yolo): anchors by k-means over the training boxes,
//! objectness, box and class losses, per-class NMS on the GPU, VOC mAP@0.5 and COCO mAP on held-out scenes;
//! or YOLOv1's layout and loss (`v1`). `cargo run --release --example yolo [-- STEPS [SIZE [anchors|v1]]]`
//! (small digit scenes and anchors by default).
use kiln_data::{ObjectSceneConfig, ObjectSource};
use kiln_models::yolo::{train_yolo, YoloConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1500);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let v1_boxes = match args.next().as_deref() {
        None | Some("anchors") => None,
        Some("v1") => Some(2),
        Some(other) => anyhow::bail!("the layout is anchors or v1, not {other:?}"),
    };
    let scenes = ObjectSceneConfig { size, objects: (1, 3), scale: (0.7, 1.4), source: ObjectSource::Digits, ..Default::default() };
    let cfg = YoloConfig { scenes, anchors: 3, v1_boxes, width: 16, steps, lr: 2e-3, test_scenes: 200, ..Default::default() };
    let (_, r) = train_yolo(&cfg, |step, loss| {
        if step % 100 == 0 {
            eprintln!("step {step}: loss {loss:.3}");
        }
    })?;
    println!("yolo on {size} x {size} digit scenes: {} steps ({:.0} ms/step), {} parameters", r.steps, r.ms_per_step, r.parameters);
    println!("  loss {:.3} -> {:.3}; {}", r.first_loss, r.last_loss, r.layout);
    if !r.anchors.is_empty() {
        println!("  anchors {:?} (mean IoU {:.3})", r.anchors, r.anchor_mean_iou);
    }
    println!("  200 held-out scenes: mAP@0.5 {:.3}, COCO mAP@[.5:.95] {:.3}", r.map50, r.coco_map);
    Ok(())
}
