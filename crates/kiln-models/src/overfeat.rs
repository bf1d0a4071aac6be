//! OverFeat-style convolutionalisation (Sermanet et al. 2014): a classifier's fully connected layers become
//! convolutions that share its weights, so the network slides over a larger image in one pass and returns a
//! map of class scores, one per window, instead of one vector.

use kiln_graph::{Conv2dGeom, Result, Tensor};
use kiln_nn::{add_channel_bias, shape_error, Layer, Linear, Module, Param};

/// A `Linear` layer applied as a convolution: its weight [out, c*h*w] read as [out, c, h, w]. Over a map of
/// exactly [c, h, w] it computes the linear layer; over a larger map it computes it at every position.
pub struct FcAsConv {
    weight: Param,
    bias: Option<Param>,
    /// The [c, h, w] the linear layer's input was flattened from.
    input: [usize; 3],
}

impl FcAsConv {
    /// `input`: the feature map the linear layer saw flattened (for a layer after another FC: [features, 1, 1]).
    pub fn from_linear(linear: &Linear, input: [usize; 3]) -> Result<FcAsConv> {
        if input.iter().product::<usize>() != linear.in_features {
            return Err(shape_error(&linear.describe(), &input, "the feature map does not flatten to the layer's input size"));
        }
        Ok(FcAsConv { weight: linear.weight.clone(), bias: linear.bias.clone(), input })
    }
}

impl Module for FcAsConv {
    fn describe(&self) -> String {
        format!("FcAsConv({}x{}x{} -> {})", self.input[0], self.input[1], self.input[2], self.weight.shape()[0])
    }
    fn own_params(&self) -> Vec<&Param> {
        std::iter::once(&self.weight).chain(self.bias.as_ref()).collect()
    }
    fn as_layer(&self) -> Option<&dyn Layer> {
        Some(self)
    }
}

impl Layer for FcAsConv {
    /// x: [n, c, H, W] -> [n, out, H - h + 1, W - w + 1]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor()?;
        let [c, h, wd] = self.input;
        let kernel = w.reshape(&[w.shape()[0], c, h, wd])?;
        add_channel_bias(x.conv2d(&kernel, Conv2dGeom::default())?, self.bias.as_ref())
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let [c, h, w] = self.input;
        if input.len() != 4 || input[1] != c || input[2] < h || input[3] < w {
            return Err(shape_error(&self.describe(), input, "expects a map at least as large as the classifier's input"));
        }
        Ok(vec![input[0], self.weight.shape()[0], input[2] - h + 1, input[3] - w + 1])
    }
}
