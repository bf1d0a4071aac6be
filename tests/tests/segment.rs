//! Segmentation networks: each decoder keeps the input's size and learns on small scenes.

use kiln_data::{ObjectSceneConfig, ObjectSource};
use kiln_models::segment::{train_segmentation, Decoder, SegmentConfig};

#[test]
fn each_decoder_trains_on_small_scenes() {
    kiln_tests::require_gpu();
    let scenes = ObjectSceneConfig { size: 32, objects: (1, 2), scale: (0.6, 1.1), source: ObjectSource::Digits, ..Default::default() };
    for decoder in [Decoder::Fcn, Decoder::SegNet, Decoder::UNet] {
        // Plain convolutions and an unweighted loss: in 40 steps batch norm's running statistics lag behind.
        let cfg = SegmentConfig { decoder, scenes, width: 8, depth: 2, batch_norm: false, median_frequency: false, batch_size: 4, steps: 40, lr: 3e-3, test_scenes: 8, ..Default::default() };
        let (_, r) = train_segmentation(&cfg, |_, _| {}).expect("training");
        eprintln!("{}: loss {:.3} -> {:.3}, pixel accuracy {:.3}, mIoU {:.3}", decoder.name(), r.first_loss, r.last_loss, r.pixel_accuracy, r.miou);
        // From ln(11) at the start; the background alone is most pixels.
        assert!(r.last_loss < 0.6 * r.first_loss && r.pixel_accuracy > 0.7, "{r:?}");
    }
    let bad = SegmentConfig { scenes: ObjectSceneConfig { size: 36, ..scenes }, depth: 3, ..Default::default() };
    assert!(train_segmentation(&bad, |_, _| {}).is_err(), "36 is not divisible by 8");
}

#[test]
fn median_frequency_balancing_as_worked_out() {
    use kiln_models::segment::median_frequency_weights;
    // Two 4-pixel maps: [0, 0, 0, 1] and [0, 0, 2, 2]; class 3 appears nowhere. Frequencies (pixels over the
    // pixels of the images holding the class): 0: 5 / 8, 1: 1 / 4, 2: 2 / 4. Their median is 1/2, so the
    // weights are 0.5 / 0.625 = 0.8, 2 and 1; class 3 gets 1.
    let maps: [&[u32]; 2] = [&[0, 0, 0, 1], &[0, 0, 2, 2]];
    let w = median_frequency_weights(maps, 4);
    for (got, want) in w.iter().zip([0.8f32, 2.0, 1.0, 1.0]) {
        assert!((got - want).abs() < 1e-6, "{w:?}");
    }
    // An even count of classes seen takes the mean of the middle two: frequencies 1/2 and 1/2 -> 1 and 1.
    assert_eq!(median_frequency_weights([&[0u32, 1][..]], 2), vec![1.0, 1.0]);
    assert_eq!(median_frequency_weights(std::iter::empty::<&[u32]>(), 3), vec![1.0; 3]);
    // A label past the classes (an ignore index) is not counted: the same weights as without it.
    let ignored: [&[u32]; 2] = [&[0, 0, 0, 1, 255], &[0, 0, 2, 2]];
    assert_eq!(median_frequency_weights(ignored, 4), w);
}

#[test]
fn a_batch_norm_net_saves_and_loads_in_evaluation_mode() {
    use kiln_models::segment::load_segmentation;
    kiln_tests::require_gpu();
    let dir = std::env::temp_dir().join(format!("kiln-segment-bn-{}", std::process::id()));
    let scenes = ObjectSceneConfig { size: 32, objects: (1, 2), scale: (0.6, 1.1), source: ObjectSource::Digits, ..Default::default() };
    let cfg = SegmentConfig { scenes, width: 8, depth: 2, batch_size: 4, steps: 5, test_scenes: 4, out_dir: Some(dir.clone()), sample_every: 2, ..Default::default() };
    assert!(cfg.batch_norm && cfg.median_frequency, "the defaults");
    let (net, r) = train_segmentation(&cfg, |_, _| {}).expect("training");
    assert_eq!(r.class_weights.len(), 11, "background and ten digits");
    assert!(r.class_weights[0] < 0.2 && r.class_weights[1..].iter().all(|&w| w > 0.5), "the background weighs least: {:?}", r.class_weights);
    // A picture every 2 steps: after steps 2 and 4, not 5. Four scenes, truth beside prediction, 32 pixels
    // drawn 8 times as large.
    for (step, written) in [(2, true), (4, true), (5, false)] {
        let path = dir.join(format!("scenes-step-{step:06}.png"));
        assert_eq!(path.exists(), written, "{}", path.display());
        if written {
            let picture = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap())).read_info().expect("a PNG");
            let (w, h) = (picture.info().width, picture.info().height);
            assert!(w >= 256 && h >= 256 && w * h >= 8 * 256 * 256, "{w} x {h}");
        }
    }
    let (loaded, info) = load_segmentation(&dir.join("segment.safetensors")).expect("loading");
    assert!(loaded.batch_norm() && info.size == 32);
    // Both in evaluation mode (running statistics), so one picture gives the same logits, whatever else is in
    // the batch.
    kiln_tests::assert_loaded_matches_trained("the loaded net's logits", 32, |x| net.forward(x), |x| loaded.forward(x));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_fcn_scores_at_the_bottom_and_upsamples_the_scores() {
    use kiln_models::segment::SegmentNet;
    kiln_tests::require_gpu();
    // FCN-32s' form: no decoder stages, a 1x1 score layer on the bottom's 32 channels (width 8, depth 3), and
    // logits at the input's size that are a bilinear upsampling of 4 x 4 scores.
    let mut vs = kiln_nn::VarStore::new(3);
    let net = SegmentNet::new(&mut vs, Decoder::Fcn, 5, 8, 3, false).unwrap();
    vs.finish().unwrap();
    let names: Vec<&str> = vs.params().map(|p| p.name()).collect();
    assert!(names.iter().all(|n| !n.starts_with("dec.") && !n.starts_with("up.")), "{names:?}");
    assert_eq!(vs.params().find(|p| p.name() == "out.weight").unwrap().shape(), &[5, 32, 1, 1]);
    let mut rng = kiln_tests::test_rng("fcn_scores");
    let px: Vec<f32> = (0..2 * 3 * 32 * 32).map(|_| rng.uniform() as f32).collect();
    let x = kiln_graph::Tensor::from_slice(&px, &[2, 3, 32, 32]).unwrap();
    let logits = kiln_graph::no_grad(|| net.forward(&x)).unwrap();
    assert_eq!(logits.shape(), &[2, 5, 32, 32]);
    // Bilinear upsampling by 8 (align_corners false) makes each output row a linear blend of two score rows: in
    // the middle of the map, three consecutive pixels between the same two score centres are evenly spaced.
    let v = logits.to_vec().unwrap();
    let at = |y: usize, x: usize| v[y * 32 + x] as f64;
    for y in [9usize, 13, 17] {
        let (a, b, c) = (at(y, 12), at(y, 13), at(y, 14));
        assert!(((b - a) - (c - b)).abs() < 1e-4 * (1.0 + a.abs() + c.abs()), "row {y}: {a} {b} {c} not on a line");
    }
}
