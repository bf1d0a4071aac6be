//! The models `kiln train` knows: one entry each (its builder, the data it takes, its default settings), so
//! the training loop has no per-model branches. A library user runs their own entry with `train::run_with`.

use kiln_data::ArrayDataset;
use kiln_graph::{Augment, KilnError, Result};
use kiln_nn::schedule::Schedule;
use kiln_nn::{LrSchedule, OptimizerKind, VarStore};

use crate::linear_models::{self as lm, Arch, Model};

/// What a model takes from its data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Rows of features, each standardised with training statistics.
    Features,
    /// One feature column expanded into powers (`--degree`, `--feature`).
    OneFeature,
    /// Whole images [c, h, w], scaled by one mean and deviation over every pixel.
    Image,
}

/// Settings that train the model well on its usual data, each overridable from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub epochs: usize,
    /// None: the whole training set per step (gradient descent as the course derives it).
    pub batch_size: Option<usize>,
    pub lr: f32,
    pub optimizer: OptimizerKind,
    pub weight_decay: f32,
    pub schedule: Schedule,
    pub augment: Option<Augment>,
}

const ADAM: OptimizerKind = OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
const COSINE: Schedule = Schedule { kind: LrSchedule::Cosine { min_factor: 0.0 }, warmup: 0 };

impl Defaults {
    const fn new(epochs: usize, batch_size: Option<usize>, lr: f32, optimizer: OptimizerKind) -> Defaults {
        Defaults { epochs, batch_size, lr, optimizer, weight_decay: 0.0, schedule: Schedule::constant(), augment: None }
    }
}

/// One trainable model.
pub struct ModelEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub input: Input,
    /// Defaults for a data set (by name).
    pub defaults: fn(&str) -> Defaults,
    /// Builds the model for a (prepared) training set.
    pub build: fn(&mut VarStore, &ArrayDataset, &Arch) -> Result<Model>,
    /// Report the normal equation's training cost beside gradient descent's (linear regression).
    pub normal_equation: bool,
}

/// The built-in models, in the order `kiln train --help` lists them.
pub const REGISTRY: [ModelEntry; 7] = [
    ModelEntry {
        name: "linreg",
        about: "linear regression by gradient descent (checked against the normal equation)",
        input: Input::Features,
        defaults: |_| Defaults::new(500, None, 0.1, OptimizerKind::Gd),
        build: |vs, d, _| lm::build_linear(vs, d, lm::regression_or_softmax),
        normal_equation: true,
    },
    ModelEntry {
        name: "polyreg",
        about: "polynomial regression on one feature (--degree)",
        input: Input::OneFeature,
        defaults: |_| Defaults::new(600, None, 0.05, ADAM),
        build: |vs, d, _| lm::build_linear(vs, d, lm::regression_or_softmax),
        normal_equation: false,
    },
    ModelEntry {
        name: "logreg",
        about: "logistic regression: binary, or one-vs-all for more classes",
        input: Input::Features,
        defaults: |_| Defaults::new(500, None, 0.5, OptimizerKind::Gd),
        build: |vs, d, _| lm::build_linear(vs, d, lm::logistic),
        normal_equation: false,
    },
    ModelEntry {
        name: "softmax",
        about: "softmax (multinomial logistic) regression",
        input: Input::Features,
        defaults: |_| Defaults::new(100, Some(64), 0.05, OptimizerKind::Sgd { momentum: 0.9, nesterov: false }),
        build: |vs, d, _| lm::build_linear(vs, d, lm::regression_or_softmax),
        normal_equation: false,
    },
    ModelEntry {
        name: "mlp",
        about: "multi-layer perceptron (--hidden 128,64 ...)",
        input: Input::Features,
        defaults: |_| Defaults::new(30, Some(32), 1e-3, ADAM),
        build: lm::build_mlp,
        normal_equation: false,
    },
    ModelEntry {
        name: "lenet",
        about: "LeNet-5 convolutional network (image data sets)",
        input: Input::Image,
        defaults: lenet_defaults,
        build: |vs, d, _| lm::build_image_classifier(vs, d, "lenet", crate::cnn::lenet5),
        normal_equation: false,
    },
    ModelEntry {
        name: "resnet",
        about: "CIFAR-style ResNet (--depth 20, 32, 56) for 28x28 / 32x32 images",
        input: Input::Image,
        defaults: |_| Defaults { schedule: COSINE, ..Defaults::new(12, Some(64), 1e-3, ADAM) },
        build: |vs, d, arch| lm::build_image_classifier(vs, d, "resnet", |vs, img, k| crate::zoo::cifar_resnet(vs, arch.depth, img[0], k)),
        normal_equation: false,
    },
];

/// The 10k MNIST digits are few for LeNet: longer, regularised training (AdamW, cosine decay, small shifts,
/// rotations and scalings); elsewhere (Fashion-MNIST, digits) plain Adam.
fn lenet_defaults(dataset: &str) -> Defaults {
    if dataset != "mnist" {
        return Defaults::new(10, Some(64), 1e-3, ADAM);
    }
    Defaults {
        weight_decay: 1e-4,
        schedule: COSINE,
        augment: Some(Augment { shift: 2, rotation: 10f32.to_radians(), scale: 0.1, ..Default::default() }),
        ..Defaults::new(40, Some(64), 1e-3, OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 })
    }
}

/// Names and descriptions, for help text.
pub const MODELS: [(&str, &str); 7] = {
    let mut out = [("", ""); 7];
    let mut i = 0;
    while i < 7 {
        out[i] = (REGISTRY[i].name, REGISTRY[i].about);
        i += 1;
    }
    out
};

/// The entry called `name`, or an error listing every name.
pub fn entry(name: &str) -> Result<&'static ModelEntry> {
    REGISTRY.iter().find(|e| e.name == name).ok_or_else(|| {
        let names: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        KilnError::Config(format!("unknown model {name:?}; available: {}", names.join(", ")))
    })
}
