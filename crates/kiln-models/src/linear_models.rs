//! Regression and classification models: linear, polynomial, logistic (binary and one-vs-all), softmax
//! regression and the multi-layer perceptron, each a network plus the task that says how it is trained.

use kiln_graph::{loss, Result, Tensor};
use kiln_nn::{Activation, Init, Linear, Layer, Module, Sequential, VarStore};

/// Names `kiln train` accepts, with a one-line description.
pub const MODELS: [(&str, &str); 7] = [
    ("linreg", "linear regression by gradient descent (checked against the normal equation)"),
    ("polyreg", "polynomial regression on one feature (--degree)"),
    ("logreg", "logistic regression: binary, or one-vs-all for more classes"),
    ("softmax", "softmax (multinomial logistic) regression"),
    ("mlp", "multi-layer perceptron (--hidden 128,64 ...)"),
    ("lenet", "LeNet-5 convolutional network (image data sets)"),
    ("resnet", "CIFAR-style ResNet (--depth 20, 32, 56) for 28x28 / 32x32 images"),
];

/// Architecture settings beyond the data: MLP widths, ResNet depth, the seed for dropout.
pub struct Arch<'a> {
    pub hidden: &'a [usize],
    pub depth: usize,
    pub seed: u64,
}

/// Models that take images [c, h, w] rather than feature vectors.
pub fn is_convolutional(name: &str) -> bool {
    matches!(name, "lenet" | "resnet")
}

/// How outputs are compared with targets, and turned into predictions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Task {
    /// Output [n, 1] against real targets, mean squared error.
    Regression,
    /// Output [n, 1] logits against 0/1 labels, binary cross-entropy; predict class 1 when p >= 0.5.
    Binary,
    /// Output [n, K] logits, one independent binary classifier per class (BCE on one-hot targets);
    /// predict the class whose classifier is most confident.
    OneVsAll,
    /// Output [n, K] logits, softmax cross-entropy.
    Softmax,
}

impl Task {
    /// The training loss of `out` against the batch targets (labels u32 [n] or values f32 [n, 1]).
    pub fn loss(self, out: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self {
            Task::Regression => loss::mse_loss(out, targets),
            Task::Binary => {
                let y = Tensor::one_hot(targets, 2)?.slice(1, 1, 1)?;
                loss::bce_with_logits(out, &y)
            }
            Task::OneVsAll => loss::bce_with_logits(out, &Tensor::one_hot(targets, out.shape()[1])?),
            Task::Softmax => loss::cross_entropy(out, targets),
        }
    }

    /// How many rows of `out` predict their label, as a GPU scalar (classification tasks; None for regression),
    /// so a training step can read it together with its loss.
    pub fn correct(self, out: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
        let _guard = kiln_graph::NoGradGuard::new();
        Ok(match self {
            Task::Regression => None,
            Task::Binary => {
                let y = Tensor::one_hot(targets, 2)?.slice(1, 1, 1)?;
                let pred = out.gt_mask(&Tensor::full_on(out.device(), &[1], 0.0)?)?;
                // agree = pred*y + (1 - pred)(1 - y) = 1 - pred - y + 2 pred y
                Some(pred.mul(&y)?.scale(2.0)?.sub(&pred)?.sub(&y)?.add_scalar(1.0)?.sum_all()?)
            }
            Task::OneVsAll | Task::Softmax => {
                let predicted = out.eq_mask(&out.max(1, true)?)?;
                Some(predicted.mul(&Tensor::one_hot(targets, out.shape()[1])?)?.sum_all()?)
            }
        })
    }

    /// Class predictions from output rows (classification tasks).
    pub fn predict(self, out: &[f32], width: usize) -> Vec<u32> {
        match self {
            Task::Binary => out.iter().map(|&z| (z >= 0.0) as u32).collect(),
            _ => kiln_nn::metrics::argmax_rows(out, width),
        }
    }
}

/// A network with its task.
pub struct Model {
    pub net: Sequential,
    pub task: Task,
    pub outputs: usize,
}

/// Builds `name` for `features` inputs (an `image` of [c, h, w] for convolutional models) and `classes`
/// classes (None: regression).
pub fn build(name: &str, vs: &mut VarStore, features: usize, image: Option<[usize; 3]>, classes: Option<usize>, arch: &Arch) -> Result<Model> {
    let hidden = arch.hidden;
    if is_convolutional(name) {
        let (Some(img), Some(k)) = (image, classes) else {
            return Err(kiln_graph::KilnError::Invalid { op: "build", shape: vec![features], message: format!("{name} needs an image classification data set (mnist, fashion-mnist, digits)") });
        };
        let body = if name == "lenet" { crate::cnn::lenet5(vs, img, k)? } else { crate::zoo::cifar_resnet(vs, arch.depth, img[0], k)? };
        let net = body.into_iter().fold(Sequential::new().push(kiln_nn::Unflatten(img)), |n, l| n.push_boxed(l));
        return Ok(Model { net, task: Task::Softmax, outputs: k });
    }
    let regression_or = |t: Task| if classes.is_none() { Task::Regression } else { t };
    let (task, outputs) = match (name, classes) {
        ("logreg", Some(2)) => (Task::Binary, 1),
        ("logreg", Some(k)) => (Task::OneVsAll, k),
        ("softmax" | "mlp", Some(k)) => (Task::Softmax, k),
        (_, None) => (Task::Regression, 1),
        (_, Some(k)) => (regression_or(Task::Softmax), k),
    };
    let mut net = Sequential::new();
    if name == "mlp" {
        let mut width = features;
        for (i, &h) in hidden.iter().enumerate() {
            net = net.push(Linear::new(vs, &format!("fc{}", i + 1), width, h, Init::HeNormal)?).push(Activation::Relu);
            width = h;
        }
        net = net.push(Linear::new(vs, &format!("fc{}", hidden.len() + 1), width, outputs, Init::XavierUniform)?);
    } else {
        net = net.push(Linear::new(vs, "linear", features, outputs, Init::Zeros)?);
    }
    Ok(Model { net, task, outputs })
}

impl Model {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.net.forward(x)
    }
    pub fn set_training(&mut self, training: bool) {
        self.net.set_training(training);
    }
}

/// Least squares by the normal equation (X^T X) theta = X^T y, in f64 on the host, with a bias column.
/// Returns theta = [bias, w_1..w_d] and the cost J = 1/(2m) sum (x.theta - y)^2.
pub fn normal_equation(x: &[f32], features: usize, y: &[f32]) -> Option<(Vec<f64>, f64)> {
    let d = features + 1;
    let m = y.len();
    let row = |i: usize| std::iter::once(1.0).chain(x[i * features..(i + 1) * features].iter().map(|&v| v as f64));
    let mut a = vec![vec![0.0f64; d + 1]; d];
    for i in 0..m {
        let r: Vec<f64> = row(i).collect();
        for p in 0..d {
            for q in 0..d {
                a[p][q] += r[p] * r[q];
            }
            a[p][d] += r[p] * y[i] as f64;
        }
    }
    // Gaussian elimination with partial pivoting on the augmented matrix.
    for col in 0..d {
        let pivot = (col..d).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        for r in 0..d {
            if r != col {
                let f = a[r][col] / a[col][col];
                for c in col..=d {
                    a[r][c] -= f * a[col][c];
                }
            }
        }
    }
    let theta: Vec<f64> = (0..d).map(|i| a[i][d] / a[i][i]).collect();
    let cost = (0..m).map(|i| (row(i).zip(&theta).map(|(v, t)| v * t).sum::<f64>() - y[i] as f64).powi(2)).sum::<f64>() / (2.0 * m as f64);
    Some((theta, cost))
}
