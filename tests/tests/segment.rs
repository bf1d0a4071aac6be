//! Segmentation networks: each decoder keeps the input's size and learns on small scenes.

use kiln_data::{ObjectSceneConfig, ObjectSource};
use kiln_models::segment::{train_segmentation, Decoder, SegmentConfig};

#[test]
fn each_decoder_trains_on_small_scenes() {
    kiln_tests::require_gpu();
    let scenes = ObjectSceneConfig { size: 32, objects: (1, 2), scale: (0.6, 1.1), source: ObjectSource::Digits, ..Default::default() };
    for decoder in [Decoder::Fcn, Decoder::SegNet, Decoder::UNet] {
        let cfg = SegmentConfig { decoder, scenes, width: 8, depth: 2, batch_size: 4, steps: 40, lr: 3e-3, test_scenes: 8, ..Default::default() };
        let (_, r) = train_segmentation(&cfg, |_, _| {}).expect("training");
        eprintln!("{}: loss {:.3} -> {:.3}, pixel accuracy {:.3}, mIoU {:.3}", decoder.name(), r.first_loss, r.last_loss, r.pixel_accuracy, r.miou);
        // From ln(11) at the start; the background alone is most pixels.
        assert!(r.last_loss < 0.6 * r.first_loss && r.pixel_accuracy > 0.7, "{r:?}");
    }
    let bad = SegmentConfig { scenes: ObjectSceneConfig { size: 36, ..scenes }, depth: 3, ..Default::default() };
    assert!(train_segmentation(&bad, |_, _| {}).is_err(), "36 is not divisible by 8");
}
