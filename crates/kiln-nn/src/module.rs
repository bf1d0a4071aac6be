//! Modules: parameters held in a [`VarStore`], sub-modules and modes ([`Module`]); one-tensor layers ([`Layer`]).

use kiln_graph::kernels::BiasAct;
use kiln_graph::{Result, Tensor};

use crate::init::Init;
use crate::varstore::{Param, VarStore};

/// What every module has, whatever its forward pass takes and returns: its parameters and sub-modules (for
/// traversal: counting, naming, freezing, saving), training or evaluation mode, and a description.
///
/// The forward pass is not part of this trait. A module from one tensor to one tensor also implements
/// [`Layer`] (what `Sequential` chains); any other module writes its own `forward` with the signature it
/// needs: several inputs, several outputs, or state carried between calls (`LstmCell::forward(&x, &state)`
/// takes an input and an `LstmState` and returns the next state). This is Burn's split; see docs/library.md, "Modules".
pub trait Module {
    /// One line naming the module and its configuration, e.g. "Conv2d(3, 64, k=11, s=4, p=2)".
    fn describe(&self) -> String;
    /// The trainable parameters this module owns directly (not its children's).
    fn own_params(&self) -> Vec<&Param> {
        Vec::new()
    }
    /// Named sub-modules, for traversal and nested summaries.
    fn children(&self) -> Vec<(String, &dyn Module)> {
        Vec::new()
    }
    /// The sub-modules, mutably, for the modes below (the same ones as `children`, in the same order).
    fn children_mut(&mut self) -> Vec<&mut dyn Module> {
        Vec::new()
    }
    /// Training or evaluation behaviour (dropout, batch norm): by default, passed to every child.
    fn set_training(&mut self, training: bool) {
        self.children_mut().into_iter().for_each(|c| c.set_training(training));
    }
    /// Synchronised batch norm on or off for every `BatchNorm` under this module (see `BatchNorm::sync`): by
    /// default, passed to every child.
    fn set_sync_batch_norm(&mut self, sync: bool) {
        self.children_mut().into_iter().for_each(|c| c.set_sync_batch_norm(sync));
    }
    /// Moves random streams (dropout masks) to where they stand after `steps` training steps, so a resumed
    /// run draws the masks the uninterrupted run would have: by default, passed to every child.
    fn set_rng_position(&mut self, steps: u64) {
        self.children_mut().into_iter().for_each(|c| c.set_rng_position(steps));
    }
    /// This module as a one-tensor [`Layer`], when it is one (summaries follow shapes through these).
    fn as_layer(&self) -> Option<&dyn Layer> {
        None
    }
    /// Trainable values of this module and everything under it.
    fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.shape().iter().product::<usize>()).sum()
    }
    /// Every parameter of this module and everything under it, its own first, then each child's in order.
    fn params(&self) -> Vec<&Param> {
        let mut all = self.own_params();
        for (_, c) in self.children() {
            all.extend(c.params());
        }
        all
    }
}

/// A module from one tensor to one tensor: what [`Sequential`] chains and the model zoo is built of.
pub trait Layer: Module {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The output shape for an input shape, computed without running anything (for summaries).
    /// Shape-preserving by default.
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    /// For a layer ending in a bias add (Linear, Conv2d): its output before the bias, the bias, and the axis it
    /// is added along. Sequential then fuses the bias with a following activation into one kernel.
    fn forward_before_bias(&self, _x: &Tensor) -> Result<Option<(Tensor, Tensor, usize)>> {
        Ok(None)
    }
    /// For a layer whose last kernel can apply a following activation itself (BatchNorm in training): that
    /// fused output, or None where it cannot (Sequential then runs the two layers apart).
    fn forward_with_activation(&self, _x: &Tensor, _act: BiasAct) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// The activation this layer is, if it is one (for that fusion).
    fn as_activation(&self) -> Option<Activation> {
        None
    }
}

/// An error for a layer given an input of the wrong shape.
pub fn shape_error(layer: &str, input: &[usize], message: &str) -> kiln_graph::KilnError {
    kiln_graph::KilnError::Invalid { op: "layer", shape: input.to_vec(), message: format!("{layer}: {message}") }
}

/// y = x W^T + b, with W stored as [out, in] (PyTorch's layout, for checkpoints).
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Parameters `{name}.weight` and `{name}.bias`; the bias starts at zero.
    pub fn new(vs: &mut VarStore, name: &str, in_features: usize, out_features: usize, init: Init) -> Result<Linear> {
        let weight = vs.param(&format!("{name}.weight"), &[out_features, in_features], init, true)?;
        let bias = Some(vs.param(&format!("{name}.bias"), &[out_features], Init::Zeros, false)?);
        Ok(Linear { weight, bias, in_features, out_features })
    }
}

impl Module for Linear {
    fn describe(&self) -> String {
        format!("Linear({}, {})", self.in_features, self.out_features)
    }
    fn own_params(&self) -> Vec<&Param> {
        std::iter::once(&self.weight).chain(self.bias.as_ref()).collect()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Linear {
    /// x: [n, in] -> [n, out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul_t(self.weight.tensor()?, false, true)?;
        match &self.bias {
            Some(b) => y.bias_act(b.tensor()?, 1, BiasAct::Identity),
            None => Ok(y),
        }
    }
    fn forward_before_bias(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor, usize)>> {
        let Some(b) = &self.bias else { return Ok(None) };
        Ok(Some((x.matmul_t(self.weight.tensor()?, false, true)?, b.tensor()?.clone(), 1)))
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() != 2 || input[1] != self.in_features {
            return Err(shape_error(&self.describe(), input, "expects [n, in_features]"));
        }
        Ok(vec![input[0], self.out_features])
    }
}

/// Elementwise activations as modules.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Tanh,
    Softplus,
    /// PyTorch's default GELU, x * Phi(x) with the exact error function.
    Gelu,
    Identity,
}

impl Module for Activation {
    fn describe(&self) -> String {
        format!("{self:?}")
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            Activation::Relu => x.relu(),
            Activation::LeakyRelu(s) => x.leaky_relu(s),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Tanh => x.tanh(),
            Activation::Softplus => x.softplus(),
            Activation::Gelu => x.gelu(),
            Activation::Identity => Ok(x.clone()),
        }
    }
    fn as_activation(&self) -> Option<Activation> {
        Some(*self)
    }
}

impl Activation {
    /// The fused kernel's form of this activation, where it has one.
    pub fn fused(self) -> Option<BiasAct> {
        match self {
            Activation::Relu => Some(BiasAct::Relu),
            Activation::Sigmoid => Some(BiasAct::Sigmoid),
            Activation::Tanh => Some(BiasAct::Tanh),
            Activation::Identity => Some(BiasAct::Identity),
            Activation::LeakyRelu(_) | Activation::Softplus | Activation::Gelu => None,
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Activation, String> {
        Ok(match s {
            "relu" => Activation::Relu,
            "leaky_relu" | "leaky-relu" => Activation::LeakyRelu(0.01),
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "softplus" => Activation::Softplus,
            "gelu" => Activation::Gelu,
            "identity" | "none" => Activation::Identity,
            _ => return Err(format!("unknown activation {s:?} (relu, leaky_relu, sigmoid, tanh, softplus, gelu, identity)")),
        })
    }
}

/// Modules applied in order.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Layer + Send + Sync>>,
}

impl Sequential {
    pub fn new() -> Sequential {
        Sequential::default()
    }
    pub fn push(mut self, m: impl Layer + Send + Sync + 'static) -> Sequential {
        self.layers.push(Box::new(m));
        self
    }
    pub fn push_boxed(mut self, m: Box<dyn Layer + Send + Sync>) -> Sequential {
        self.layers.push(m);
        self
    }
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl IntoIterator for Sequential {
    type Item = Box<dyn Layer + Send + Sync>;
    type IntoIter = std::vec::IntoIter<Box<dyn Layer + Send + Sync>>;
    fn into_iter(self) -> Self::IntoIter {
        self.layers.into_iter()
    }
}

impl Module for Sequential {
    fn set_training(&mut self, training: bool) {
        for l in &mut self.layers {
            l.set_training(training);
        }
    }
    fn set_rng_position(&mut self, steps: u64) {
        for l in &mut self.layers {
            l.set_rng_position(steps);
        }
    }
    fn set_sync_batch_norm(&mut self, sync: bool) {
        for l in &mut self.layers {
            l.set_sync_batch_norm(sync);
        }
    }
    fn describe(&self) -> String {
        format!("Sequential({} layers)", self.layers.len())
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        self.layers.iter().enumerate().map(|(i, l)| (i.to_string(), l.as_ref() as &dyn Module)).collect()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for Sequential {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let mut i = 0;
        while i < self.layers.len() {
            // A layer ending in a bias followed by an activation: one fused kernel instead of two.
            let next_act = self.layers.get(i + 1).and_then(|l| l.as_activation()).and_then(Activation::fused);
            if let (Some(act), true) = (next_act, kiln_graph::fusion_enabled(h.device())) {
                if let Some((pre, bias, axis)) = self.layers[i].forward_before_bias(&h)? {
                    h = pre.bias_act(&bias, axis, act)?;
                    i += 2;
                    continue;
                }
                if let Some(y) = self.layers[i].forward_with_activation(&h, act)? {
                    h = y;
                    i += 2;
                    continue;
                }
            }
            h = self.layers[i].forward(&h)?;
            i += 1;
        }
        Ok(h)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.layers.iter().try_fold(input.to_vec(), |s, l| l.output_shape(&s))
    }
}
