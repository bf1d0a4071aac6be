//! Neural style transfer (kiln_models::style): the Gram matrix against the CPU reference, the style loss's
//! gradient with respect to the pixels by finite differences through a convolution, layer names as in the
//! paper, torchvision-named checkpoints, the style loss falling tenfold, and clear errors.

use kiln_data::picture::Picture;
use kiln_graph::cpu::CpuTensor;
use kiln_graph::{Rng, Tensor};
use kiln_models::style::{gram_matrix, style_layer_loss, transfer, StyleConfig, VggFeatures};
use kiln_tests::{check_op, require_gpu, Domain};

#[test]
fn gram_matrices_match_the_reference() {
    check_op(
        "gram matrix",
        &[(&[2, 3, 4, 5], Domain::Any)],
        |x| gram_matrix(&x[0]),
        |x| {
            let f = &x[0].data;
            let data = (0..2 * 9).map(|k| {
                let (n, i, j) = (k / 9, (k % 9) / 3, k % 3);
                (0..20).map(|p| f[(n * 3 + i) * 20 + p] * f[(n * 3 + j) * 20 + p]).sum()
            });
            CpuTensor::new(data.collect(), &[2, 3, 3])
        },
    );
}

#[test]
fn the_style_loss_gradient_reaches_the_pixels() {
    require_gpu();
    // relu1_1 of a narrow random VGG: one 3x3 convolution (3 -> 4 channels) on normalised pixels.
    let net = VggFeatures::random(16, 7).unwrap();
    let conv = net.conv(0).unwrap();
    let w: Vec<f64> = conv.weight.tensor().unwrap().to_vec().unwrap().iter().map(|&v| v as f64).collect();
    let b: Vec<f64> = conv.bias.as_ref().unwrap().tensor().unwrap().to_vec().unwrap().iter().map(|&v| v as f64).collect();
    let target: Vec<f32> = (0..16).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let target_t = Tensor::from_slice(&target, &[1, 4, 4]).unwrap();
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let geom = kiln_graph::Conv2dGeom { padding: [1, 1], ..Default::default() };
    check_op(
        "style loss through relu1_1",
        &[(&[1, 3, 6, 7], Domain::Any)],
        |x| style_layer_loss(&net.features(&x[0], &["relu1_1"])?["relu1_1"], &target_t),
        |x| {
            let norm: Vec<f64> = x[0].data.iter().enumerate().map(|(i, v)| (v - mean[i / 42]) / std[i / 42]).collect();
            let y = CpuTensor::new(norm, &[1, 3, 6, 7]).conv2d(&CpuTensor::new(w.clone(), &[4, 3, 3, 3]), &geom);
            let f: Vec<f64> = y.data.iter().enumerate().map(|(i, v)| (v + b[i / 42]).max(0.0)).collect();
            let mut loss = 0.0;
            for i in 0..4 {
                for j in 0..4 {
                    let g: f64 = (0..42).map(|p| f[i * 42 + p] * f[j * 42 + p]).sum();
                    loss += (g - target[i * 4 + j] as f64).powi(2);
                }
            }
            CpuTensor::new(vec![loss / (4.0 * 16.0 * 42.0 * 42.0)], &[])
        },
    );
}

#[test]
fn layers_are_named_as_in_the_paper_and_bad_input_is_an_error() {
    require_gpu();
    let net = VggFeatures::random(16, 1).unwrap();
    let names = net.layer_names();
    // VGG-19: 16 convolutions in blocks of 2, 2, 4, 4, 4.
    assert_eq!(names.len(), 32);
    for n in ["relu1_1", "conv2_2", "relu3_4", "relu4_2", "relu5_1", "conv5_4"] {
        assert!(names.iter().any(|m| m == n), "{n} missing from {names:?}");
    }
    let x = Tensor::zeros(&[1, 3, 32, 32]).unwrap();
    let e = net.features(&x, &["relu6_1"]).unwrap_err().to_string();
    assert!(e.contains("relu6_1") && e.contains("relu5_1"), "{e}");
    let e = net.features(&Tensor::zeros(&[1, 3, 8, 8]).unwrap(), &["relu5_1"]).unwrap_err().to_string();
    assert!(e.contains("too small"), "{e}");
    let e = kiln_data::picture::load_picture(std::path::Path::new("/nonexistent/starry.jpg")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/starry.jpg"), "{e}");
    let e = kiln_data::picture::decode_picture("notes.txt", b"hello").unwrap_err().to_string();
    assert!(e.contains("notes.txt") && e.contains("neither a PNG nor a JPEG"), "{e}");
    let e = VggFeatures::from_checkpoint(std::path::Path::new("/nonexistent/vgg19.safetensors")).err().expect("no file").to_string();
    assert!(e.contains("/nonexistent/vgg19.safetensors"), "{e}");
}

#[test]
fn a_torchvision_named_checkpoint_loads_with_its_layout() {
    require_gpu();
    // A VGG-16-shaped `features` (indices 0, 2, 5, 7, 10, ...) with few channels, written as a checkpoint.
    let convs = [(0, 3, 4), (2, 4, 4), (5, 4, 6), (7, 6, 6), (10, 6, 8)];
    let mut rng = Rng::new(3);
    let mut tensors = Vec::new();
    for &(i, c_in, c_out) in &convs {
        let w: Vec<f32> = (0..c_out * c_in * 9).map(|_| rng.normal() as f32 * 0.2).collect();
        tensors.push(kiln_nn::checkpoint::NamedTensor { name: format!("features.{i}.weight"), shape: vec![c_out, c_in, 3, 3], data: w });
        tensors.push(kiln_nn::checkpoint::NamedTensor { name: format!("features.{i}.bias"), shape: vec![c_out], data: vec![0.1; c_out] });
    }
    let dir = std::env::temp_dir().join(format!("kiln-style-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vgg.safetensors");
    kiln_nn::checkpoint::save(&path, &kiln_nn::checkpoint::Checkpoint { tensors: tensors.clone(), ..Default::default() }).unwrap();
    let net = VggFeatures::from_checkpoint(&path).unwrap();
    assert_eq!(net.layer_names(), ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "conv2_1", "relu2_1", "conv2_2", "relu2_2", "conv3_1", "relu3_1"]);
    assert_eq!(net.conv(5).unwrap().weight.tensor().unwrap().to_vec().unwrap(), tensors[4].data);
    let f = net.features(&Tensor::zeros(&[1, 3, 16, 16]).unwrap(), &["relu3_1"]).unwrap();
    assert_eq!(f["relu3_1"].shape(), &[1, 8, 4, 4]);
    // A convolution whose input channels do not follow: an error naming the file and the layer.
    tensors[2].shape = vec![4, 5, 3, 3];
    tensors[2].data = vec![0.0; 180];
    kiln_nn::checkpoint::save(&path, &kiln_nn::checkpoint::Checkpoint { tensors, ..Default::default() }).unwrap();
    let e = VggFeatures::from_checkpoint(&path).err().expect("mismatched channels").to_string();
    assert!(e.contains("vgg.safetensors") && e.contains("features.2"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_style_loss_falls_tenfold() {
    require_gpu();
    let mut rng = Rng::new(5);
    let picture = |h: usize, w: usize, rng: &mut Rng| Picture { pixels: (0..3 * h * w).map(|_| rng.uniform() as f32).collect(), h, w };
    // Stripes for a style, noise for the content; from noise, style only.
    let style = Picture { pixels: (0..3 * 32 * 32).map(|i| if (i % 32) / 4 % 2 == 0 { 0.9 } else { 0.1 }).collect(), h: 32, w: 32 };
    let content = picture(32, 32, &mut rng);
    let net = VggFeatures::random(16, 2).unwrap();
    let cfg =
        StyleConfig { style_layers: vec!["relu1_1".into(), "relu2_1".into(), "relu3_1".into()], content_weight: 0.0, tv_weight: 0.0, steps: 150, lr: 0.05, from_content: false, ..Default::default() };
    let (out, r) = transfer(&net, &content, &style, &cfg, |_, _| {}).unwrap();
    eprintln!("{r:?}");
    assert!(r.last.style * 10.0 <= r.first.style, "style loss {} -> {}", r.first.style, r.last.style);
    assert_eq!((out.h, out.w), (32, 32));
    assert!(out.pixels.iter().all(|v| (0.0..=1.0).contains(v)));
    // L-BFGS, as the paper: the same evaluations, a lower loss than Adam's.
    let lbfgs = StyleConfig { optimizer: kiln_models::style::StyleOptimizer::Lbfgs, lr: 1.0, ..cfg };
    let (_, l) = transfer(&net, &content, &style, &lbfgs, |_, _| {}).unwrap();
    eprintln!("L-BFGS: {l:?}");
    assert!(l.last.style * 10.0 <= l.first.style && l.last.style < r.last.style, "L-BFGS: style loss {} -> {} (Adam {})", l.first.style, l.last.style, r.last.style);
}
