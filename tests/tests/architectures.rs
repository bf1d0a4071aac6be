//! The classic architectures: exact parameter counts at 1000 classes (torchvision's), output shapes, a
//! training step of reduced-width variants, and OverFeat-style convolutionalisation.

use kiln_graph::{loss, Rng, Tensor};
use kiln_models::zoo::{self, build_named};
use kiln_nn::{Layer, Module, Optimizer, OptimizerKind, VarStore};
use kiln_tests::require_gpu;

fn count(name: &str, input: [usize; 3], classes: usize) -> (usize, Vec<usize>) {
    let mut vs = VarStore::shapes_only();
    let net = build_named(&mut vs, name, input, classes, 0).unwrap();
    let out = net.output_shape(&[2, input[0], input[1], input[2]]).unwrap();
    let rows = zoo::summarize(&net, &[2, input[0], input[1], input[2]]).unwrap();
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), vs.num_values(), "{name}: summary rows must add up to the total");
    (vs.num_values(), out)
}

#[test]
fn parameter_counts_match_the_reference_implementations() {
    for (name, params) in
        [("alexnet", 61_100_840), ("vgg16", 138_357_544), ("vgg16_bn", 138_365_992), ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032), ("googlenet", 6_624_904)]
    {
        let (n, out) = count(name, [3, 224, 224], 1000);
        assert_eq!(n, params, "{name}");
        assert_eq!(out, vec![2, 1000], "{name}");
    }
    assert_eq!(count("lenet", [1, 28, 28], 10).0, 61_706);
    assert_eq!(count("lenet", [1, 32, 32], 10).0, 61_706);
}

#[test]
fn classes_and_input_size_are_configurable() {
    let (n10, out) = count("resnet18", [3, 224, 224], 10);
    assert_eq!(n10, 11_689_512 - 512 * 990 - 990);
    assert_eq!(out, vec![2, 10]);
    assert_eq!(count("resnet20", [1, 28, 28], 10).1, vec![2, 10]);
    assert_eq!(count("resnet56", [3, 32, 32], 100).1, vec![2, 100]);
    assert_eq!(count("alexnet", [3, 227, 227], 5).1, vec![2, 5]);
    // A 64x64 input gives VGG a 2x2 map, which the adaptive pool cannot stretch to 7x7: a clear error.
    let mut vs = VarStore::shapes_only();
    let vgg = build_named(&mut vs, "vgg16", [3, 64, 64], 10, 0).unwrap();
    assert!(vgg.output_shape(&[1, 3, 64, 64]).is_err());
}

fn train_step(name: &str, net: &mut kiln_nn::Sequential, vs: &VarStore, input: [usize; 4], classes: usize) {
    let mut rng = Rng::new(3);
    let x = Tensor::randn(&input, 1.0, &mut rng).unwrap();
    let labels: Vec<u32> = (0..input[0]).map(|i| (i % classes) as u32).collect();
    let y = Tensor::from_u32(&labels, &[input[0]]).unwrap();
    let mut opt = Optimizer::new(vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 1e-3, 0.0, kiln_nn::schedule::Schedule::constant(), 10).unwrap();
    net.set_training(true);
    let mut losses = Vec::new();
    for _ in 0..3 {
        let out = net.forward(&x).unwrap();
        assert_eq!(out.shape(), &[input[0], classes], "{name}");
        let l = loss::cross_entropy(&out, &y).unwrap();
        let g = l.backward().unwrap();
        assert_eq!(g.len(), vs.params().filter(|p| !vs.is_buffer(p.name())).count(), "{name}: every parameter gets a gradient");
        opt.step(vs, &g).unwrap();
        losses.push(l.to_scalar().unwrap());
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
    assert!(losses[2] < losses[0], "{name}: three Adam steps on one batch should lower the loss: {losses:?}");
}

#[test]
fn reduced_width_vgg_with_batch_norm_trains() {
    require_gpu();
    let mut vs = VarStore::new(1);
    let mut net = zoo::vgg16(&mut vs, 1, 10, true, 16, 1, 1).unwrap();
    vs.finish().unwrap();
    train_step("vgg16_bn/16", &mut net, &vs, [4, 1, 32, 32], 10);
}

#[test]
fn resnet20_trains() {
    require_gpu();
    let mut vs = VarStore::new(1);
    let mut net = build_named(&mut vs, "resnet20", [1, 28, 28], 10, 0).unwrap();
    vs.finish().unwrap();
    train_step("resnet20", &mut net, &vs, [4, 1, 28, 28], 10);
}

#[test]
fn small_googlenet_and_resnet_bottleneck_run() {
    require_gpu();
    // The full networks on a small image: exercises inception concat and bottleneck blocks end to end.
    for name in ["googlenet", "resnet50"] {
        let mut vs = VarStore::new(1);
        let mut net = build_named(&mut vs, name, [3, 64, 64], 7, 0).unwrap();
        vs.finish().unwrap();
        net.set_training(false);
        let x = Tensor::randn(&[1, 3, 64, 64], 1.0, &mut Rng::new(2)).unwrap();
        let out = kiln_graph::no_grad(|| net.forward(&x)).unwrap();
        assert_eq!(out.shape(), &[1, 7], "{name}");
        assert!(out.to_vec().unwrap().iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn overfeat_score_map_equals_the_classifier_on_each_window() {
    use kiln_graph::Pool2dGeom;
    use kiln_models::overfeat::FcAsConv;
    use kiln_nn::{Activation, Conv2d, Conv2dConfig, Flatten, Init, Linear, MaxPool2d, Sequential};
    require_gpu();
    let mut vs = VarStore::new(5);
    // 26x26 windows: conv3 -> 24, pool -> 12, conv3 -> 10, pool -> 5; the map's stride is 4 pixels.
    let features = Sequential::new()
        .push(Conv2d::new(&mut vs, "features.0", 1, 4, 3, Conv2dConfig::default()).unwrap())
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::square(2)))
        .push(Conv2d::new(&mut vs, "features.3", 4, 6, 3, Conv2dConfig::default()).unwrap())
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::square(2)));
    let fc1 = Linear::new(&mut vs, "classifier.0", 6 * 5 * 5, 32, Init::HeNormal).unwrap();
    let fc2 = Linear::new(&mut vs, "classifier.2", 32, 10, Init::HeNormal).unwrap();
    let (conv1, conv2) = (FcAsConv::from_linear(&fc1, [6, 5, 5]).unwrap(), FcAsConv::from_linear(&fc2, [32, 1, 1]).unwrap());
    vs.finish().unwrap();
    let classifier = Sequential::new().push(Flatten).push(fc1).push(Activation::Relu).push(fc2);
    let score_map = Sequential::new().push(conv1).push(Activation::Relu).push(conv2);

    let (size, window, stride) = (34usize, 26usize, 4usize);
    let mut rng = Rng::new(11);
    let image: Vec<f32> = (0..size * size).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let big = Tensor::from_slice(&image, &[1, 1, size, size]).unwrap();
    let map = score_map.forward(&features.forward(&big).unwrap()).unwrap();
    let side = (size - window) / stride + 1;
    assert_eq!(map.shape(), &[1, 10, side, side]);
    let map = map.to_vec().unwrap();
    for i in 0..side {
        for j in 0..side {
            let crop: Vec<f32> = (0..window).flat_map(|r| image[(i * stride + r) * size + j * stride..][..window].to_vec()).collect();
            let x = Tensor::from_slice(&crop, &[1, 1, window, window]).unwrap();
            let scores = classifier.forward(&features.forward(&x).unwrap()).unwrap().to_vec().unwrap();
            for k in 0..10 {
                let m = map[(k * side + i) * side + j];
                assert!((m - scores[k]).abs() <= 1e-4 * (1.0 + scores[k].abs()), "window ({i},{j}) class {k}: map {m} vs classifier {}", scores[k]);
            }
        }
    }
}
