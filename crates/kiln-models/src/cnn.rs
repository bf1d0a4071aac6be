//! Convolutional networks.

use kiln_graph::{Pool2dGeom, Result};
use kiln_nn::{Activation, Conv2d, Conv2dConfig, Flatten, Init, Linear, MaxPool2d, Padding, Sequential, VarStore};

/// LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, as it is usually taught today:
/// conv 6@5x5 -> pool 2 -> conv 16@5x5 -> pool 2 -> fc 120 -> fc 84 -> fc classes.
/// Inputs smaller than 32x32 are zero-padded to 32x32 by the first convolution (28x28 MNIST: padding 2), so
/// the second pooling always yields 16 maps of 5x5. 61,706 parameters at 10 classes. Parameter names follow
/// a PyTorch `features` / `classifier` pair of `nn.Sequential`s (`features.0.weight` is conv1), so
/// `--freeze features` freezes the convolutional part.
pub fn lenet5(vs: &mut VarStore, input: [usize; 3], classes: usize) -> Result<Sequential> {
    let [c, h, w] = input;
    let pad = ((32usize.saturating_sub(h)) / 2, (32usize.saturating_sub(w)) / 2);
    let conv1 = Conv2d::new(vs, "features.0", c, 6, 5, Conv2dConfig { padding: Padding::Explicit(pad.0, pad.1), ..Default::default() })?;
    let conv2 = Conv2d::new(vs, "features.3", 6, 16, 5, Conv2dConfig::default())?;
    // Spatial size after conv1 (k5), pool 2, conv2 (k5), pool 2.
    let side = |n: usize, p: usize| ((n + 2 * p - 4) / 2 - 4) / 2;
    let flat = 16 * side(h, pad.0) * side(w, pad.1);
    Ok(Sequential::new()
        .push(conv1)
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::square(2)))
        .push(conv2)
        .push(Activation::Relu)
        .push(MaxPool2d(Pool2dGeom::square(2)))
        .push(Flatten)
        .push(Linear::new(vs, "classifier.0", flat, 120, Init::HeNormal)?)
        .push(Activation::Relu)
        .push(Linear::new(vs, "classifier.2", 120, 84, Init::HeNormal)?)
        .push(Activation::Relu)
        .push(Linear::new(vs, "classifier.4", 84, classes, Init::XavierUniform)?))
}
