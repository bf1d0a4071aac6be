//! A CNN of your own, trained on your own tensors and saved: 8x8 images of a horizontal or a vertical bar
//! in noise, told apart by a conv layer and a linear head. `cargo run --release --example custom_model`
use kiln::prelude::*;

fn bars(n: usize, rng: &mut Rng) -> (Vec<f32>, Vec<u32>) {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (vertical, at) = (i % 2 == 1, rng.below(8));
        x.extend((0..64).map(|p| if (if vertical { p % 8 } else { p / 8 }) == at { 1.0 } else { 0.0 } + 0.3 * rng.normal() as f32));
        y.push(vertical as u32);
    }
    (x, y)
}

fn main() -> anyhow::Result<()> {
    let mut rng = Rng::new(7);
    let mut vs = VarStore::new(7);
    let net = Sequential::new()
        .push(Conv2d::new(&mut vs, "conv", 1, 8, 3, Conv2dConfig { padding: Padding::Same, ..Default::default() })?)
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::square(2)))
        .push(Flatten)
        .push(Linear::new(&mut vs, "head", 8 * 4 * 4, 2, Init::XavierUniform)?);
    vs.finish()?;
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 3e-3, 0.0, Schedule::constant(), 200)?;
    for step in 0..200 {
        let (x, y) = bars(32, &mut rng);
        let loss = loss::cross_entropy(&net.forward(&Tensor::from_slice(&x, &[32, 1, 8, 8])?)?, &Tensor::from_u32(&y, &[32])?)?;
        opt.step(&vs, &loss.backward()?)?;
        if step % 50 == 49 {
            println!("step {:3}  loss {:.4}", step + 1, loss.to_scalar()?);
        }
    }
    let (x, y) = bars(500, &mut rng);
    let logits = no_grad(|| net.forward(&Tensor::from_slice(&x, &[500, 1, 8, 8])?))?.to_vec()?;
    let accuracy = metrics::accuracy(&metrics::argmax_rows(&logits, 2), &y);
    println!("held-out accuracy {accuracy:.3}");
    checkpoint::save(std::path::Path::new("bars.safetensors"), &vs.to_checkpoint()?)?;
    println!("saved bars.safetensors ({} parameters)", vs.num_values());
    anyhow::ensure!(accuracy > 0.95, "the bars should be told apart: accuracy {accuracy}");
    Ok(())
}
