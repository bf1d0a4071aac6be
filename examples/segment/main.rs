//! Semantic segmentation of scenes of real objects with three decoders over one encoder: an FCN without skips,
//! SegNet (unpooling with the encoder's switches) and U-Net (transposed convolutions and skip concatenation)
//! (kiln_models::segment). Pixel accuracy and mIoU on held-out scenes.
//! `cargo run --release --example segment [-- STEPS [SIZE]]` (64 x 64 digit scenes by default).
use kiln_data::{ObjectSceneConfig, ObjectSource};
use kiln_models::segment::{train_segmentation, Decoder, SegmentConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let scenes = ObjectSceneConfig { size, objects: (1, 3), scale: (0.7, 1.4), source: ObjectSource::Digits, ..Default::default() };
    for decoder in [Decoder::Fcn, Decoder::SegNet, Decoder::UNet] {
        let cfg = SegmentConfig { decoder, scenes, steps, ..Default::default() };
        let (_, r) = train_segmentation(&cfg, |_, _| {})?;
        println!(
            "{:<6} {} steps ({:.0} ms/step), {} parameters: loss {:.3} -> {:.3}; held-out pixel accuracy {:.3}, mIoU {:.3}",
            decoder.name(),
            r.steps,
            r.ms_per_step,
            r.parameters,
            r.first_loss,
            r.last_loss,
            r.pixel_accuracy,
            r.miou
        );
    }
    Ok(())
}
