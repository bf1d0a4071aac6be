//! A differentiable op of your own with its own WGSL kernels, without editing Kiln: SiLU (x * sigmoid(x),
//! PyTorch's nn.SiLU), gradchecked, then trained in a small network. `cargo run --release --example custom_op`
use kiln::graph::custom::{grid_1d, launch, CustomOp, Params};
use kiln::graph::{DType, Result};
use kiln::prelude::*;

static SILU: kiln::backend::Shader = kiln::backend::Shader::new("custom_op/silu.wgsl", include_str!("silu.wgsl"));

struct Silu;

impl CustomOp for Silu {
    fn name(&self) -> &str {
        "silu"
    }
    fn forward(&self, x: &[&Tensor]) -> Result<Tensor> {
        if x.len() != 1 || x[0].dtype() != DType::F32 {
            return Err(KilnError::Usage("silu takes one f32 tensor".into()));
        }
        let n = x[0].numel();
        Ok(launch(&SILU, "silu_forward", Params::new().u32(n), x, &[x[0].shape()], grid_1d(n as u64, 256))?.remove(0))
    }
    fn backward(&self, x: &[&Tensor], _y: &Tensor, grad_y: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let n = x[0].numel();
        let gx = launch(&SILU, "silu_backward", Params::new().u32(n), &[grad_y, x[0]], &[x[0].shape()], grid_1d(n as u64, 256))?.remove(0);
        Ok(vec![Some(gx)])
    }
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    Tensor::custom_op(Silu, &[x])
}

fn main() -> anyhow::Result<()> {
    // Fit y = sin(3x) on [-1, 1] with Linear -> SiLU -> Linear.
    let xs: Vec<f32> = (0..256).map(|i| i as f32 / 127.5 - 1.0).collect();
    let ys: Vec<f32> = xs.iter().map(|x| (3.0 * x).sin()).collect();
    let (x, y) = (Tensor::from_slice(&xs, &[256, 1])?, Tensor::from_slice(&ys, &[256, 1])?);
    let mut vs = VarStore::new(1);
    let (fc1, fc2) = (Linear::new(&mut vs, "fc1", 1, 32, Init::HeNormal)?, Linear::new(&mut vs, "fc2", 32, 1, Init::XavierUniform)?);
    vs.finish()?;
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 1e-2, 0.0, Schedule::constant(), 500)?;
    for step in 0..500 {
        let loss = loss::mse_loss(&fc2.forward(&silu(&fc1.forward(&x)?)?)?, &y)?;
        opt.step(&vs, &loss.backward()?)?;
        if step % 100 == 99 {
            println!("step {:3}: mse {:.5}", step + 1, loss.to_scalar()?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln::graph::cpu::CpuTensor;
    use kiln::graph::gradcheck::{gradcheck, Domain};

    #[test]
    fn silu_matches_its_cpu_reference_and_finite_differences() {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let mut rng = kiln::graph::Rng::new(seed);
        for shape in [&[3usize, 5][..], &[1031][..]] {
            let report = gradcheck(
                "silu",
                &[(shape, Domain::Any)],
                &mut rng,
                Default::default(),
                |x| super::silu(&x[0]),
                |x| CpuTensor::new(x[0].data.iter().map(|v| v / (1.0 + (-v).exp())).collect(), &x[0].shape),
            );
            report.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}
