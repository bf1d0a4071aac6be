//! The classic architectures with torchvision's layer names and layouts, so parameter counts match the papers'
//! reference implementations exactly (at 1000 classes) and checkpoints load by name in PyTorch.
//!
//! | model | parameters at 1000 classes |
//! |---|---|
//! | AlexNet (torchvision single-GPU variant) | 61,100,840 |
//! | VGG-16 / with batch norm | 138,357,544 / 138,365,992 |
//! | ResNet-18 / 34 / 50 | 11,689,512 / 21,797,672 / 25,557,032 |
//! | GoogLeNet (Inception v1, no auxiliary heads) | 6,624,904 |

use kiln_graph::kernels::BiasAct;
use kiln_graph::{Pool2dGeom, Result, Tensor};
use kiln_nn::{shape_error, Activation, AdaptiveAvgPool2d, BatchNorm, Conv2d, Conv2dConfig, Dropout, Flatten, GlobalAvgPool, Init, Layer, Linear, MaxPool2d, Module, Padding, Sequential, VarStore};

fn conv(vs: &mut VarStore, name: &str, cin: usize, cout: usize, k: usize, stride: usize, pad: usize, bias: bool) -> Result<Conv2d> {
    Conv2d::new(vs, name, cin, cout, k, Conv2dConfig { stride, padding: Padding::Explicit(pad, pad), bias, init: Init::HeNormal, ..Default::default() })
}

/// AlexNet, torchvision's single-GPU variant (64-192-384-256-256 channels).
pub fn alexnet(vs: &mut VarStore, in_ch: usize, classes: usize, seed: u64) -> Result<Sequential> {
    let features = Sequential::new()
        .push(conv(vs, "features.0", in_ch, 64, 11, 4, 2, true)?)
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::new(3, 2, 0)))
        .push(conv(vs, "features.3", 64, 192, 5, 1, 2, true)?)
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::new(3, 2, 0)))
        .push(conv(vs, "features.6", 192, 384, 3, 1, 1, true)?)
        .push(Activation::Relu)
        .push(conv(vs, "features.8", 384, 256, 3, 1, 1, true)?)
        .push(Activation::Relu)
        .push(conv(vs, "features.10", 256, 256, 3, 1, 1, true)?)
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::new(3, 2, 0)));
    Ok(Sequential::new()
        .push(features)
        .push(AdaptiveAvgPool2d([6, 6]))
        .push(Flatten)
        .push(Dropout::new(0.5, seed)?)
        .push(Linear::new(vs, "classifier.1", 256 * 36, 4096, Init::HeNormal)?)
        .push(Activation::Relu)
        .push(Dropout::new(0.5, seed + 1)?)
        .push(Linear::new(vs, "classifier.4", 4096, 4096, Init::HeNormal)?)
        .push(Activation::Relu)
        .push(Linear::new(vs, "classifier.6", 4096, classes, Init::XavierUniform)?))
}

/// VGG configuration "D" (16 weight layers), optionally with batch norm after every convolution. `width`
/// divides every channel count (1 = the paper's network; larger values give the reduced variants the tests
/// train), `pool_to` is the adaptive pool's output side (7 for 224x224 inputs).
pub fn vgg16(vs: &mut VarStore, in_ch: usize, classes: usize, batch_norm: bool, width: usize, pool_to: usize, seed: u64) -> Result<Sequential> {
    const CFG: [usize; 18] = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0];
    let mut features = Sequential::new();
    let (mut c, mut i) = (in_ch, 0);
    for &v in &CFG {
        if v == 0 {
            features = features.push(MaxPool2d(Pool2dGeom::square(2)));
            i += 1;
            continue;
        }
        let out = (v / width.max(1)).max(1);
        features = features.push(conv(vs, &format!("features.{i}"), c, out, 3, 1, 1, true)?);
        i += 1;
        if batch_norm {
            features = features.push(BatchNorm::new(vs, &format!("features.{i}"), out)?);
            i += 1;
        }
        features = features.push(Activation::Relu);
        i += 1;
        c = out;
    }
    let hidden = (4096 / width.max(1)).max(1);
    Ok(Sequential::new()
        .push(features)
        .push(AdaptiveAvgPool2d([pool_to, pool_to]))
        .push(Flatten)
        .push(Linear::new(vs, "classifier.0", c * pool_to * pool_to, hidden, Init::HeNormal)?)
        .push(Activation::Relu)
        .push(Dropout::new(0.5, seed)?)
        .push(Linear::new(vs, "classifier.3", hidden, hidden, Init::HeNormal)?)
        .push(Activation::Relu)
        .push(Dropout::new(0.5, seed + 1)?)
        .push(Linear::new(vs, "classifier.6", hidden, classes, Init::XavierUniform)?))
}

/// conv-bn(-relu) helper for the residual blocks: torchvision's convolutions there have no bias.
fn conv_bn(vs: &mut VarStore, prefix: &str, idx: usize, cin: usize, cout: usize, k: usize, stride: usize) -> Result<(Conv2d, BatchNorm)> {
    Ok((conv(vs, &format!("{prefix}.conv{idx}"), cin, cout, k, stride, k / 2, false)?, BatchNorm::new(vs, &format!("{prefix}.bn{idx}"), cout)?))
}

/// The projection shortcut: 1x1 conv (stride s) + batch norm, named `downsample.0` / `downsample.1`.
fn downsample(vs: &mut VarStore, prefix: &str, cin: usize, cout: usize, stride: usize) -> Result<Option<Sequential>> {
    if stride == 1 && cin == cout {
        return Ok(None);
    }
    Ok(Some(Sequential::new().push(conv(vs, &format!("{prefix}.downsample.0"), cin, cout, 1, stride, 0, false)?).push(BatchNorm::new(vs, &format!("{prefix}.downsample.1"), cout)?)))
}

/// Residual block of ResNet-18/34 and the CIFAR ResNets: relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)).
pub struct BasicBlock {
    convs: Vec<(Conv2d, BatchNorm)>,
    shortcut: Option<Sequential>,
}

impl BasicBlock {
    pub fn new(vs: &mut VarStore, prefix: &str, cin: usize, cout: usize, stride: usize) -> Result<BasicBlock> {
        let convs = vec![conv_bn(vs, prefix, 1, cin, cout, 3, stride)?, conv_bn(vs, prefix, 2, cout, cout, 3, 1)?];
        Ok(BasicBlock { convs, shortcut: downsample(vs, prefix, cin, cout, stride)? })
    }
}

/// Bottleneck block of ResNet-50 (v1.5: the stride sits on the 3x3 convolution): 1x1 reduce, 3x3, 1x1 expand x4.
pub struct Bottleneck {
    convs: Vec<(Conv2d, BatchNorm)>,
    shortcut: Option<Sequential>,
}

impl Bottleneck {
    pub fn new(vs: &mut VarStore, prefix: &str, cin: usize, width: usize, stride: usize) -> Result<Bottleneck> {
        let convs = vec![conv_bn(vs, prefix, 1, cin, width, 1, 1)?, conv_bn(vs, prefix, 2, width, width, 3, stride)?, conv_bn(vs, prefix, 3, width, width * 4, 1, 1)?];
        Ok(Bottleneck { convs, shortcut: downsample(vs, prefix, cin, width * 4, stride)? })
    }
}

fn residual_forward(convs: &[(Conv2d, BatchNorm)], shortcut: &Option<Sequential>, x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for (i, (c, bn)) in convs.iter().enumerate() {
        let pre = c.forward(&h)?;
        h = if i + 1 < convs.len() {
            // Batch norm and ReLU in one kernel where the fused kernels apply.
            match bn.forward_fused(&pre, BiasAct::Relu)? {
                Some(y) => y,
                None => bn.forward(&pre)?.relu()?,
            }
        } else {
            bn.forward(&pre)?
        };
    }
    let skip = match shortcut {
        Some(s) => s.forward(x)?,
        None => x.clone(),
    };
    h.add(&skip)?.relu()
}

fn residual_shape(convs: &[(Conv2d, BatchNorm)], input: &[usize]) -> Result<Vec<usize>> {
    convs.iter().try_fold(input.to_vec(), |s, (c, _)| c.output_shape(&s))
}

fn residual_children<'a>(convs: &'a [(Conv2d, BatchNorm)], shortcut: &'a Option<Sequential>) -> Vec<(String, &'a dyn Module)> {
    let mut v: Vec<(String, &dyn Module)> = Vec::new();
    for (i, (c, bn)) in convs.iter().enumerate() {
        v.push((format!("conv{}", i + 1), c));
        v.push((format!("bn{}", i + 1), bn));
    }
    if let Some(s) = shortcut {
        v.push(("downsample".into(), s));
    }
    v
}

macro_rules! residual_module {
    ($t:ty, $name:literal) => {
        impl Module for $t {
            fn set_training(&mut self, training: bool) {
                for (_, bn) in &mut self.convs {
                    bn.set_training(training);
                }
                if let Some(s) = &mut self.shortcut {
                    s.set_training(training);
                }
            }
            fn set_sync_batch_norm(&mut self, sync: bool) {
                for (_, bn) in &mut self.convs {
                    bn.set_sync_batch_norm(sync);
                }
                if let Some(s) = &mut self.shortcut {
                    s.set_sync_batch_norm(sync);
                }
            }
            fn describe(&self) -> String {
                let w = self.convs[0].0.weight.shape();
                format!("{}({} -> {})", $name, w[1], self.convs.last().map(|c| c.0.weight.shape()[0]).unwrap_or(0))
            }
            fn children(&self) -> Vec<(String, &dyn Module)> {
                residual_children(&self.convs, &self.shortcut)
            }
            fn as_layer(&self) -> Option<&dyn Layer> {
                Some(self)
            }
        }

        impl Layer for $t {
            fn forward(&self, x: &Tensor) -> Result<Tensor> {
                residual_forward(&self.convs, &self.shortcut, x)
            }
            fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
                residual_shape(&self.convs, input)
            }
        }
    };
}
residual_module!(BasicBlock, "BasicBlock");
residual_module!(Bottleneck, "Bottleneck");

/// ResNet-18, 34 (basic blocks) or 50 (bottlenecks) for ImageNet-sized inputs, torchvision's names.
pub fn resnet(vs: &mut VarStore, depth: usize, in_ch: usize, classes: usize) -> Result<Sequential> {
    let (blocks, bottleneck): ([usize; 4], bool) = match depth {
        18 => ([2, 2, 2, 2], false),
        34 => ([3, 4, 6, 3], false),
        50 => ([3, 4, 6, 3], true),
        _ => return Err(shape_error("resnet", &[depth], "ImageNet ResNet depth must be 18, 34 or 50 (20, 32, 56 are the CIFAR variants)")),
    };
    let mut net = Sequential::new().push(conv(vs, "conv1", in_ch, 64, 7, 2, 3, false)?).push(BatchNorm::new(vs, "bn1", 64)?).push(Activation::Relu).push(MaxPool2d(Pool2dGeom::new(3, 2, 1)));
    let mut c = 64;
    for (stage, &n) in blocks.iter().enumerate() {
        let width = 64 << stage;
        for b in 0..n {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            let prefix = format!("layer{}.{b}", stage + 1);
            if bottleneck {
                net = net.push(Bottleneck::new(vs, &prefix, c, width, stride)?);
                c = width * 4;
            } else {
                net = net.push(BasicBlock::new(vs, &prefix, c, width, stride)?);
                c = width;
            }
        }
    }
    Ok(net.push(GlobalAvgPool).push(Linear::new(vs, "fc", c, classes, Init::XavierUniform)?))
}

/// The CIFAR ResNets of He et al. (depth 6n+2: 20, 32, 56, ...): a 3x3 stem of 16 channels, three stages of
/// n basic blocks at 16, 32, 64 channels, global pooling, a linear classifier. Shortcuts that change shape use
/// the 1x1 projection (option B). For 28x28 or 32x32 inputs.
pub fn cifar_resnet(vs: &mut VarStore, depth: usize, in_ch: usize, classes: usize) -> Result<Sequential> {
    if depth < 8 || !(depth - 2).is_multiple_of(6) {
        return Err(shape_error("resnet", &[depth], "CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...)"));
    }
    let n = (depth - 2) / 6;
    let mut net = Sequential::new().push(conv(vs, "conv1", in_ch, 16, 3, 1, 1, false)?).push(BatchNorm::new(vs, "bn1", 16)?).push(Activation::Relu);
    let mut c = 16;
    for stage in 0..3 {
        let width = 16 << stage;
        for b in 0..n {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            net = net.push(BasicBlock::new(vs, &format!("layer{}.{b}", stage + 1), c, width, stride)?);
            c = width;
        }
    }
    Ok(net.push(GlobalAvgPool).push(Linear::new(vs, "fc", c, classes, Init::XavierUniform)?))
}

/// torchvision's BasicConv2d: conv (no bias) + batch norm + relu.
fn basic_conv(vs: &mut VarStore, name: &str, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Result<Sequential> {
    let mut bn = BatchNorm::new(vs, &format!("{name}.bn"), cout)?;
    bn.eps = 1e-3;
    Ok(Sequential::new().push(conv(vs, &format!("{name}.conv"), cin, cout, k, stride, pad, false)?).push(bn).push(Activation::Relu))
}

/// An Inception module: four branches concatenated along channels — 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's
/// "5x5" branch, which it implements as 3x3); 3x3 max pool -> 1x1. The 1x1 convolutions are the bottlenecks
/// that keep the module cheap.
pub struct Inception {
    branches: Vec<Sequential>,
}

impl Inception {
    #[allow(clippy::too_many_arguments)]
    pub fn new(vs: &mut VarStore, name: &str, cin: usize, c1: usize, c3r: usize, c3: usize, c5r: usize, c5: usize, pool_proj: usize) -> Result<Inception> {
        let b1 = basic_conv(vs, &format!("{name}.branch1"), cin, c1, 1, 1, 0)?;
        let b2 = Sequential::new().push(basic_conv(vs, &format!("{name}.branch2.0"), cin, c3r, 1, 1, 0)?).push(basic_conv(vs, &format!("{name}.branch2.1"), c3r, c3, 3, 1, 1)?);
        let b3 = Sequential::new().push(basic_conv(vs, &format!("{name}.branch3.0"), cin, c5r, 1, 1, 0)?).push(basic_conv(vs, &format!("{name}.branch3.1"), c5r, c5, 3, 1, 1)?);
        let pool = Pool2dGeom { ceil_mode: true, ..Pool2dGeom::new(3, 1, 1) };
        let b4 = Sequential::new().push(MaxPool2d(pool)).push(basic_conv(vs, &format!("{name}.branch4.1"), cin, pool_proj, 1, 1, 0)?);
        Ok(Inception { branches: vec![b1, b2, b3, b4] })
    }
}

impl Module for Inception {
    fn set_training(&mut self, training: bool) {
        self.branches.iter_mut().for_each(|b| b.set_training(training));
    }
    fn set_sync_batch_norm(&mut self, sync: bool) {
        self.branches.iter_mut().for_each(|b| b.set_sync_batch_norm(sync));
    }
    fn describe(&self) -> String {
        "Inception".into()
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        self.branches.iter().enumerate().map(|(i, b)| (format!("branch{}", i + 1), b as &dyn Module)).collect()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Inception {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let outs = self.branches.iter().map(|b| b.forward(x)).collect::<Result<Vec<_>>>()?;
        Tensor::concat(&outs.iter().collect::<Vec<_>>(), 1)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let shapes = self.branches.iter().map(|b| b.output_shape(input)).collect::<Result<Vec<_>>>()?;
        let mut out = shapes[0].clone();
        out[1] = shapes.iter().map(|s| s[1]).sum();
        Ok(out)
    }
}

/// GoogLeNet (Inception v1) without the auxiliary classifiers, torchvision's layout.
pub fn googlenet(vs: &mut VarStore, in_ch: usize, classes: usize, seed: u64) -> Result<Sequential> {
    let pool = |k, s| MaxPool2d(Pool2dGeom { ceil_mode: true, ..Pool2dGeom::new(k, s, 0) });
    let mut net = Sequential::new()
        .push(basic_conv(vs, "conv1", in_ch, 64, 7, 2, 3)?)
        .push(pool(3, 2))
        .push(basic_conv(vs, "conv2", 64, 64, 1, 1, 0)?)
        .push(basic_conv(vs, "conv3", 64, 192, 3, 1, 1)?)
        .push(pool(3, 2));
    let spec: [(&str, usize, [usize; 6]); 9] = [
        ("inception3a", 192, [64, 96, 128, 16, 32, 32]),
        ("inception3b", 256, [128, 128, 192, 32, 96, 64]),
        ("inception4a", 480, [192, 96, 208, 16, 48, 64]),
        ("inception4b", 512, [160, 112, 224, 24, 64, 64]),
        ("inception4c", 512, [128, 128, 256, 24, 64, 64]),
        ("inception4d", 512, [112, 144, 288, 32, 64, 64]),
        ("inception4e", 528, [256, 160, 320, 32, 128, 128]),
        ("inception5a", 832, [256, 160, 320, 32, 128, 128]),
        ("inception5b", 832, [384, 192, 384, 48, 128, 128]),
    ];
    for (name, cin, [c1, c3r, c3, c5r, c5, pp]) in spec {
        net = net.push(Inception::new(vs, name, cin, c1, c3r, c3, c5r, c5, pp)?);
        if name == "inception3b" || name == "inception4e" {
            net = net.push(if name == "inception3b" { pool(3, 2) } else { pool(2, 2) });
        }
    }
    Ok(net.push(GlobalAvgPool).push(Dropout::new(0.2, seed)?).push(Linear::new(vs, "fc", 1024, classes, Init::XavierUniform)?))
}

/// Architectures `kiln summary` and `build_named` know, with their default input [c, h, w].
pub const ZOO: [(&str, [usize; 3]); 12] = [
    ("lenet", [1, 28, 28]),
    ("alexnet", [3, 224, 224]),
    ("vgg16", [3, 224, 224]),
    ("vgg16_bn", [3, 224, 224]),
    ("resnet18", [3, 224, 224]),
    ("resnet34", [3, 224, 224]),
    ("resnet50", [3, 224, 224]),
    ("resnet20", [3, 32, 32]),
    ("resnet32", [3, 32, 32]),
    ("resnet56", [3, 32, 32]),
    ("googlenet", [3, 224, 224]),
    ("inception", [3, 224, 224]),
];

/// Builds an architecture by name for an input [c, h, w] and a number of classes.
pub fn build_named(vs: &mut VarStore, name: &str, input: [usize; 3], classes: usize, seed: u64) -> Result<Sequential> {
    let c = input[0];
    match name {
        "lenet" => crate::cnn::lenet5(vs, input, classes),
        // The benchmark MLP: flatten -> 128 ReLU -> classes (784-128-10 on MNIST-sized input).
        "mlp" => Ok(Sequential::new()
            .push(kiln_nn::Flatten)
            .push(kiln_nn::Linear::new(vs, "fc1", input.iter().product(), 128, kiln_nn::Init::HeNormal)?)
            .push(kiln_nn::Activation::Relu)
            .push(kiln_nn::Linear::new(vs, "fc2", 128, classes, kiln_nn::Init::XavierUniform)?)),
        "alexnet" => alexnet(vs, c, classes, seed),
        "vgg16" | "vgg16_bn" => vgg16(vs, c, classes, name == "vgg16_bn", 1, 7, seed),
        "resnet18" => resnet(vs, 18, c, classes),
        "resnet34" => resnet(vs, 34, c, classes),
        "resnet50" => resnet(vs, 50, c, classes),
        "googlenet" | "inception" => googlenet(vs, c, classes, seed),
        _ => match name.strip_prefix("resnet").and_then(|d| d.parse::<usize>().ok()) {
            Some(depth) => cifar_resnet(vs, depth, c, classes),
            None => Err(shape_error(name, &input, &format!("unknown architecture; known: {}", ZOO.map(|z| z.0).join(", ")))),
        },
    }
}

/// One row of a model summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SummaryRow {
    pub name: String,
    pub layer: String,
    pub output_shape: Vec<usize>,
    pub params: usize,
}

/// The parameter names under a module.
fn param_names(m: &dyn Module, out: &mut Vec<String>) {
    out.extend(m.own_params().iter().map(|p| p.name().to_string()));
    for (_, c) in m.children() {
        param_names(c, out);
    }
}

/// A layer's name: the dotted prefix its parameters share (as PyTorch names the module), or "-" for a layer
/// without parameters.
fn layer_name(m: &dyn Module) -> String {
    let mut names = Vec::new();
    param_names(m, &mut names);
    let Some(first) = names.first() else { return "-".into() };
    let mut parts: Vec<&str> = first.split('.').collect();
    parts.pop(); // "weight", "bias", ...
    for n in &names[1..] {
        let other: Vec<&str> = n.split('.').collect();
        let common = parts.iter().zip(&other).take_while(|(a, b)| a == b).count();
        parts.truncate(common);
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(".")
    }
}

/// Keras-style rows: nested `Sequential`s are expanded, blocks (residual, inception) are one row each.
pub fn summarize(net: &dyn Module, input: &[usize]) -> Result<Vec<SummaryRow>> {
    fn walk(m: &dyn Module, shape: &mut Vec<usize>, rows: &mut Vec<SummaryRow>) -> Result<()> {
        for (_, child) in m.children() {
            if child.describe().starts_with("Sequential(") {
                walk(child, shape, rows)?;
            } else {
                let layer = child.as_layer().ok_or_else(|| shape_error(&child.describe(), shape, "not a one-tensor layer: a summary cannot follow shapes through it"))?;
                *shape = layer.output_shape(shape)?;
                rows.push(SummaryRow { name: layer_name(child), layer: child.describe(), output_shape: shape.clone(), params: child.num_params() });
            }
        }
        Ok(())
    }
    let mut shape = input.to_vec();
    let mut rows = Vec::new();
    walk(net, &mut shape, &mut rows)?;
    Ok(rows)
}
