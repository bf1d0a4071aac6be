//! A two-stage detector with a mask head (kiln_models::rcnn, torchvision's Faster / Mask R-CNN rules at a
//! small size) on scenes of real objects: box mAP@0.5, COCO box and mask AP on held-out scenes.
//! `cargo run --release --example rcnn [-- STEPS [SIZE]]` (small digit scenes by default).
use kiln_data::{ObjectSceneConfig, ObjectSource};
use kiln_models::rcnn::{train_two_stage, TwoStageConfig, TwoStageRun};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1500);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let scenes = ObjectSceneConfig { size, objects: (1, 3), scale: (0.7, 1.4), source: ObjectSource::Digits, ..Default::default() };
    let model = TwoStageConfig { anchor_sizes: vec![12.0, 20.0, 32.0], representation: 128, ..Default::default() };
    let run = TwoStageRun { model, scenes, batch_size: 8, steps, lr: 1e-3, test_scenes: 200, ..Default::default() };
    let (_, r) = train_two_stage(&run, |step, loss| {
        if step % 50 == 0 {
            eprintln!("step {step}: loss {loss:.3}");
        }
    })?;
    println!("two-stage detector on {size} x {size} digit scenes: {} steps ({:.0} ms/step), {} parameters", r.steps, r.ms_per_step, r.parameters);
    let p = r.last_parts;
    println!("  loss {:.3} -> {:.3} (rpn objectness {:.3}, rpn box {:.3}, classifier {:.3}, box {:.3}, mask {:.3})", r.first_loss, r.last_loss, p[0], p[1], p[2], p[3], p[4]);
    println!("  200 held-out scenes: box mAP@0.5 {:.3}, COCO box mAP {:.3}; mask AP@0.5 {:.3}, COCO mask mAP {:.3}", r.box_map50, r.box_coco_map, r.mask_map50, r.mask_coco_map);
    Ok(())
}
