//! One forward pass of the big ImageNet architectures on a 224x224 image, untrained (the point is that they
//! run, on any adapter: VGG-16's 411 MB classifier weight exceeds lavapipe's 128 MiB binding limit and is split).
//! `cargo run --release --example imagenet_forward -- [alexnet vgg16 vgg16_bn resnet18 resnet34 resnet50 googlenet]`

use std::time::Instant;

use kiln_graph::{no_grad, Rng, Tensor};
use kiln_models::zoo;
use kiln_nn::{Layer, Module, VarStore};

fn main() -> anyhow::Result<()> {
    let mut names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        names = ["alexnet", "resnet18", "googlenet", "resnet50", "vgg16"].map(String::from).to_vec();
    }
    let image = Tensor::randn(&[1, 3, 224, 224], 1.0, &mut Rng::new(0))?;
    println!("{:<10} {:>14} {:>12} {:>12}  adapter {}", "model", "parameters", "build s", "forward s", kiln_graph::backend::gpu()?.adapter_name());
    for name in names {
        let started = Instant::now();
        let mut vs = VarStore::new(1);
        let mut net = zoo::build_named(&mut vs, &name, [3, 224, 224], 1000, 1)?;
        vs.finish()?;
        net.set_training(false);
        let built = started.elapsed().as_secs_f64();
        let t = Instant::now();
        let logits = no_grad(|| net.forward(&image))?;
        let values = logits.to_vec()?;
        anyhow::ensure!(logits.shape() == [1, 1000] && values.iter().all(|v| v.is_finite()), "{name}: bad output {:?}", logits.shape());
        println!("{name:<10} {:>14} {built:>12.2} {:>12.2}", vs.num_values(), t.elapsed().as_secs_f64());
    }
    Ok(())
}
