//! Parameter initialisation. Fans follow PyTorch's layouts: a weight [out, in, ...] has fan_in = in * receptive
//! field and fan_out = out * receptive field.

use kiln_graph::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Constant(f32),
    Uniform {
        lo: f32,
        hi: f32,
    },
    Normal {
        std: f32,
    },
    /// Glorot & Bengio: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
    XavierUniform,
    /// Glorot & Bengio: N(0, 2 / (fan_in + fan_out)).
    XavierNormal,
    /// He et al.: U(-a, a), a = sqrt(6 / fan_in) (for ReLU nets).
    HeUniform,
    /// He et al.: N(0, 2 / fan_in).
    HeNormal,
    /// N(0, 1) * sqrt(1 / fan_in): the course's "sqrt(1/n[l-1])" scaling.
    ScaledNormal,
}

pub fn fans(shape: &[usize]) -> (usize, usize) {
    match shape.len() {
        0 => (1, 1),
        1 => (shape[0], shape[0]),
        _ => {
            let receptive: usize = shape[2..].iter().product();
            (shape[1] * receptive, shape[0] * receptive)
        }
    }
}

impl Init {
    pub fn values(self, shape: &[usize], rng: &mut Rng) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let (fan_in, fan_out) = fans(shape);
        let (fi, fo) = (fan_in.max(1) as f64, fan_out.max(1) as f64);
        let uniform = |a: f64, rng: &mut Rng| (0..n).map(|_| rng.range(-a, a) as f32).collect::<Vec<_>>();
        let normal = |s: f64, rng: &mut Rng| (0..n).map(|_| (rng.normal() * s) as f32).collect::<Vec<_>>();
        match self {
            Init::Zeros => vec![0.0; n],
            Init::Constant(c) => vec![c; n],
            Init::Uniform { lo, hi } => (0..n).map(|_| rng.range(lo as f64, hi as f64) as f32).collect(),
            Init::Normal { std } => normal(std as f64, rng),
            Init::XavierUniform => uniform((6.0 / (fi + fo)).sqrt(), rng),
            Init::XavierNormal => normal((2.0 / (fi + fo)).sqrt(), rng),
            Init::HeUniform => uniform((6.0 / fi).sqrt(), rng),
            Init::HeNormal => normal((2.0 / fi).sqrt(), rng),
            Init::ScaledNormal => normal((1.0 / fi).sqrt(), rng),
        }
    }
}
