//! The optimizer as PyTorch users expect it: frozen parameters get no gradient computed, a parameter without
//! a gradient is left untouched (moments, weight decay and Adam's step count included), parameter groups with
//! their own learning rate and weight decay, clipping by global norm and by value, gradient accumulation over
//! micro-batches, and updates in bindable pieces under a lowered binding limit (real AlexNet and VGG-16 steps).

use kiln_graph::backend::{Device, DeviceOptions};
use kiln_graph::{loss, Grads, Rng, Tensor};
use kiln_nn::schedule::Schedule;
use kiln_nn::{Clip, GroupOptions, Init, Layer, Optimizer, OptimizerKind, VarStore};
use kiln_tests::{require_gpu, test_rng};

const ADAM: OptimizerKind = OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
const SGD: OptimizerKind = OptimizerKind::Gd;

/// A store of named parameters with random values, finished.
fn store(shapes: &[(&str, &[usize])], rng: &mut Rng) -> VarStore {
    let mut vs = VarStore::new(rng.below(1 << 30) as u64);
    for (name, shape) in shapes {
        vs.param(name, shape, Init::Normal { std: 1.0 }, true).unwrap();
    }
    vs.finish().unwrap();
    vs
}

fn values(vs: &VarStore, name: &str) -> Vec<f32> {
    vs.params().find(|p| p.name() == name).unwrap().tensor().unwrap().to_vec().unwrap()
}

/// Gradients given on the host, by parameter name.
fn grads_of(vs: &VarStore, given: &[(&str, Vec<f32>)]) -> Grads {
    let mut g = Grads::default();
    for (name, v) in given {
        let p = vs.params().find(|p| p.name() == *name).unwrap();
        g.insert(p.tensor().unwrap(), Tensor::from_slice(v, p.shape()).unwrap()).unwrap();
    }
    g
}

fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn assert_near(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn frozen_parameters_get_no_gradient_computed() {
    require_gpu();
    let mut vs = VarStore::new(3);
    let net = kiln_models::cnn::lenet5(&mut vs, [1, 28, 28], 10).unwrap();
    vs.finish().unwrap();
    let x = Tensor::randn(&[4, 1, 28, 28], 1.0, &mut Rng::new(1)).unwrap();
    let y = Tensor::from_u32(&[1, 2, 3, 4], &[4]).unwrap();
    let backward_dispatches = || {
        let l = loss::cross_entropy(&net.forward(&x).unwrap(), &y).unwrap();
        l.to_scalar().unwrap();
        let before = kiln_graph::backend::thread_stats().dispatches;
        let g = l.backward().unwrap();
        (kiln_graph::backend::thread_stats().dispatches - before, g)
    };
    let (all, g_all) = backward_dispatches();
    let frozen = vs.freeze(|n| n.starts_with("features."));
    assert_eq!(frozen.len(), 4);
    let (some, g_some) = backward_dispatches();
    assert!(some < all, "backward ran {some} dispatches with the features frozen, {all} without");
    for p in vs.params() {
        let t = p.tensor().unwrap();
        assert_eq!(g_some.get(t).is_some(), !frozen.contains(&p.name().to_string()), "{}", p.name());
    }
    assert_eq!(g_all.len(), 10);
    assert_eq!(g_some.len(), 6);
}

#[test]
fn a_parameter_without_a_gradient_is_left_untouched() {
    require_gpu();
    let mut rng = test_rng("no gradient, no update");
    let vs = store(&[("a", &[5]), ("b", &[7])], &mut rng);
    let mut opt = Optimizer::new(&vs, ADAM, 0.01, 0.1, Schedule::constant(), 10).unwrap();
    let b0 = values(&vs, "b");
    for _ in 0..2 {
        opt.step(&vs, &grads_of(&vs, &[("a", random(5, &mut rng))])).unwrap();
    }
    assert_eq!(values(&vs, "b"), b0, "b got no gradient and must not move (weight decay included)");
    // b's first update is Adam's first step (bias-corrected with b's own count, 1): w - lr * g / (|g| + eps),
    // after L2 decay added to the gradient.
    let gb = random(7, &mut rng);
    opt.step(&vs, &grads_of(&vs, &[("b", gb.clone())])).unwrap();
    let want: Vec<f64> = b0
        .iter()
        .zip(&gb)
        .map(|(&w, &g)| {
            let g = g as f64 + 0.1 * w as f64;
            w as f64 - 0.01 * g / (g.abs() + 1e-8)
        })
        .collect();
    assert_near("b after its first update", &values(&vs, "b"), &want);
}

#[test]
fn parameter_groups_have_their_own_learning_rate_and_weight_decay() {
    require_gpu();
    let mut rng = test_rng("groups");
    let vs = store(&[("body.w", &[6]), ("head.w", &[4]), ("stem.w", &[3])], &mut rng);
    let mut opt = Optimizer::new(&vs, SGD, 0.1, 0.0, Schedule::constant(), 10).unwrap();
    assert_eq!(opt.add_group(|n| n.starts_with("head."), GroupOptions { lr: Some(0.5), weight_decay: Some(0.2), frozen: false }), vec!["head.w"]);
    opt.add_group(|n| n.starts_with("stem."), GroupOptions { frozen: true, ..Default::default() });
    let before: Vec<Vec<f32>> = ["body.w", "head.w", "stem.w"].iter().map(|n| values(&vs, n)).collect();
    let (gb, gh, gs) = (random(6, &mut rng), random(4, &mut rng), random(3, &mut rng));
    opt.step(&vs, &grads_of(&vs, &[("body.w", gb.clone()), ("head.w", gh.clone()), ("stem.w", gs)])).unwrap();
    let sgd = |w: &[f32], g: &[f32], lr: f64, wd: f64| -> Vec<f64> { w.iter().zip(g).map(|(&w, &g)| w as f64 - lr * (g as f64 + wd * w as f64)).collect() };
    assert_near("body", &values(&vs, "body.w"), &sgd(&before[0], &gb, 0.1, 0.0));
    assert_near("head", &values(&vs, "head.w"), &sgd(&before[1], &gh, 0.5, 0.2));
    assert_eq!(values(&vs, "stem.w"), before[2], "a frozen group does not move");
    let stem = vs.params().find(|p| p.name() == "stem.w").unwrap().clone();
    assert!(!stem.requires_grad());
    // Moved out of the frozen group, it trains again.
    opt.add_group(|n| n.starts_with("stem."), GroupOptions::default());
    assert!(stem.requires_grad());
}

#[test]
fn clipping_by_global_norm_and_by_value() {
    require_gpu();
    let mut rng = test_rng("clipping");
    let vs = store(&[("a", &[5]), ("b", &[9])], &mut rng);
    let (ga, gb) = (random(5, &mut rng), random(9, &mut rng));
    let norm = ga.iter().chain(&gb).map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
    for (clip, max) in [(Clip::GlobalNorm(0.5), 0.5f64), (Clip::GlobalNorm(1e3), 1e3), (Clip::Value(0.3), 0.3)] {
        let before = (values(&vs, "a"), values(&vs, "b"));
        let mut opt = Optimizer::new(&vs, SGD, 1.0, 0.0, Schedule::constant(), 10).unwrap();
        opt.clip = Some(clip);
        opt.step(&vs, &grads_of(&vs, &[("a", ga.clone()), ("b", gb.clone())])).unwrap();
        let clipped = |g: f32| -> f64 {
            match clip {
                Clip::GlobalNorm(_) => g as f64 * (max / (norm + 1e-6)).min(1.0),
                Clip::Value(v) => (g as f64).clamp(-v as f64, v as f64),
            }
        };
        for (name, w, g) in [("a", &before.0, &ga), ("b", &before.1, &gb)] {
            let want: Vec<f64> = w.iter().zip(g.iter()).map(|(&w, &g)| w as f64 - clipped(g)).collect();
            assert_near(&format!("{clip:?} {name}"), &values(&vs, name), &want);
        }
        if let Clip::GlobalNorm(_) = clip {
            let got = opt.last_grad_norm().unwrap().to_scalar().unwrap() as f64;
            assert!((got - norm).abs() <= 1e-5 * norm, "norm {got} vs {norm}");
        }
    }
}

#[test]
fn accumulated_micro_batches_equal_one_step_on_their_sum() {
    require_gpu();
    let mut rng = test_rng("accumulation");
    let vs = store(&[("a", &[6]), ("b", &[3])], &mut rng);
    let before = (values(&vs, "a"), values(&vs, "b"));
    let mut opt = Optimizer::new(&vs, SGD, 0.1, 0.0, Schedule::constant(), 10).unwrap();
    let (g1, g2, gb) = (random(6, &mut rng), random(6, &mut rng), random(3, &mut rng));
    opt.accumulate(&grads_of(&vs, &[("a", g1.clone())])).unwrap();
    opt.accumulate(&grads_of(&vs, &[("a", g2.clone()), ("b", gb.clone())])).unwrap();
    assert_eq!(values(&vs, "a"), before.0, "accumulating does not update");
    opt.apply(&vs).unwrap();
    let want_a: Vec<f64> = (0..6).map(|i| before.0[i] as f64 - 0.1 * (g1[i] as f64 + g2[i] as f64)).collect();
    let want_b: Vec<f64> = (0..3).map(|i| before.1[i] as f64 - 0.1 * gb[i] as f64).collect();
    assert_near("a", &values(&vs, "a"), &want_a);
    assert_near("b", &values(&vs, "b"), &want_b);
    // The next cycle starts from zero.
    let g3 = random(6, &mut rng);
    let a1 = values(&vs, "a");
    opt.step(&vs, &grads_of(&vs, &[("a", g3.clone())])).unwrap();
    let want: Vec<f64> = (0..6).map(|i| a1[i] as f64 - 0.1 * g3[i] as f64).collect();
    assert_near("a, next step", &values(&vs, "a"), &want);
    // A gradient of the wrong shape is refused by name.
    let p = vs.params().find(|p| p.name() == "a").unwrap();
    let mut bad = Grads::default();
    assert!(bad.insert(p.tensor().unwrap(), Tensor::zeros(&[2, 3]).unwrap()).unwrap_err().to_string().contains("[6]"));
}

/// A device on the default adapter whose kernels bind at most `bytes` per tensor.
fn limited_device(bytes: u64) -> Device {
    let adapter = require_gpu().info.name.clone();
    let d = Device::open(&DeviceOptions { adapter: Some(adapter), max_binding_bytes: Some(bytes), ..Default::default() }).unwrap();
    kiln_graph::tune::set_mode(&d, Some(kiln_graph::tune::Mode::Off));
    d
}

#[test]
fn updates_run_in_bindable_pieces_under_a_lowered_limit() {
    let dev = limited_device(4096);
    dev.scope(|| {
        let mut rng = test_rng("pieces");
        // 3,000 floats (12 KB) in one parameter: three pieces of at most 1,024 floats.
        let vs = store(&[("big", &[3000]), ("small", &[5])], &mut rng);
        assert_eq!(vs.device().unwrap(), dev);
        let w0 = values(&vs, "big");
        let g = random(3000, &mut rng);
        let mut opt = Optimizer::new(&vs, ADAM, 0.01, 0.0, Schedule::constant(), 10).unwrap();
        let before = kiln_graph::backend::thread_stats().dispatches;
        opt.step(&vs, &grads_of(&vs, &[("big", g.clone()), ("small", random(5, &mut rng))])).unwrap();
        assert!(kiln_graph::backend::thread_stats().dispatches - before >= 3, "one dispatch cannot bind 12 KB here");
        let want: Vec<f64> = w0.iter().zip(&g).map(|(&w, &g)| w as f64 - 0.01 * g as f64 / ((g as f64).abs() + 1e-8)).collect();
        assert_near("big after one Adam step", &values(&vs, "big"), &want);
        // Accumulating over it adds in pieces too: plain gradient descent on the sum of two micro-batches.
        let (g1, g2) = (random(3000, &mut rng), random(3000, &mut rng));
        let w1 = values(&vs, "big");
        let mut sgd = Optimizer::new(&vs, SGD, 0.1, 0.0, Schedule::constant(), 10).unwrap();
        sgd.accumulate(&grads_of(&vs, &[("big", g1.clone())])).unwrap();
        sgd.accumulate(&grads_of(&vs, &[("big", g2.clone())])).unwrap();
        sgd.apply(&vs).unwrap();
        let want: Vec<f64> = (0..3000).map(|i| w1[i] as f64 - 0.1 * (g1[i] as f64 + g2[i] as f64)).collect();
        assert_near("big after two accumulated micro-batches", &values(&vs, "big"), &want);
    });
}

/// Two Adam steps of a zoo network on random images: finite losses, every parameter moved.
fn zoo_steps(name: &str, build: impl Fn(&mut VarStore) -> kiln_nn::Sequential, input: [usize; 4], classes: usize) {
    let mut vs = VarStore::new(1);
    let net = build(&mut vs);
    vs.finish().unwrap();
    let flat = 4 * vs.flat_len() as u64;
    let limit = vs.device().unwrap().max_binding_bytes();
    assert!(flat > limit, "{name}: {flat} bytes of parameters fit one binding of {limit}: no pieces exercised");
    let x = Tensor::randn(&input, 1.0, &mut Rng::new(2)).unwrap();
    let y = Tensor::from_u32(&(0..input[0] as u32).map(|i| i % classes as u32).collect::<Vec<_>>(), &[input[0]]).unwrap();
    let probe = vs.params().last().unwrap().clone();
    let before = probe.tensor().unwrap().to_vec().unwrap();
    let mut opt = Optimizer::new(&vs, ADAM, 1e-4, 0.0, Schedule::constant(), 10).unwrap();
    for step in 0..2 {
        let l = loss::cross_entropy(&net.forward(&x).unwrap(), &y).unwrap();
        let g = l.backward().unwrap();
        opt.step(&vs, &g).unwrap();
        let v = l.to_scalar().unwrap();
        assert!(v.is_finite(), "{name} step {step}: loss {v}");
    }
    assert_ne!(probe.tensor().unwrap().to_vec().unwrap(), before, "{name}: {} did not move", probe.name());
}

#[test]
fn alexnet_and_vgg16_take_training_steps_with_parameters_over_the_binding_limit() {
    // The full-width networks (AlexNet 57 M parameters with 10 classes; VGG-16 on 32x32 images with a 1x1
    // adaptive pool, 34 M) on a device binding at most 32 MiB: their flat parameter buffers (229 / 134 MB) and
    // largest weights exceed it, as AlexNet's and VGG-16's exceed lavapipe's own 128 MiB. VGG-16's small
    // images keep the test fast; AlexNet needs 224x224 for its 6x6 map.
    let dev = limited_device(32 << 20);
    dev.scope(|| {
        zoo_steps("alexnet", |vs| kiln_models::zoo::alexnet(vs, 3, 10, 0).unwrap(), [1, 3, 224, 224], 10);
        zoo_steps("vgg16", |vs| kiln_models::zoo::vgg16(vs, 3, 10, false, 1, 1, 0).unwrap(), [1, 3, 32, 32], 10);
    });
}
