//! Regression and classification models: linear, polynomial, logistic (binary and one-vs-all), softmax
//! regression and the multi-layer perceptron, each a network plus the task that says how it is trained.

use kiln_data::ArrayDataset;
use kiln_graph::{loss, Result, Tensor};
use kiln_nn::{Activation, Init, Layer, Linear, Module, Sequential, VarStore};

/// Architecture settings beyond the data: MLP widths, ResNet depth, the seed for dropout.
pub struct Arch<'a> {
    pub hidden: &'a [usize],
    pub depth: usize,
    pub seed: u64,
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
    /// The training loss of `out` against the batch targets (labels u32 `[n]` or values f32 `[n, 1]`).
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
                // Class 1 when the logit is >= 0 (p >= 0.5), as `predict` says: 1 - [0 > z].
                let pred = Tensor::full_on(out.device(), &[1], 0.0)?.gt_mask(out)?.affine(-1.0, 1.0)?;
                // agree = pred*y + (1 - pred)(1 - y) = 1 - pred - y + 2 pred y
                Some(pred.mul(&y)?.scale(2.0)?.sub(&pred)?.sub(&y)?.add_scalar(1.0)?.sum_all()?)
            }
            Task::OneVsAll | Task::Softmax => {
                // The first of the tied maxima is the prediction (argmax's rule, as `predict` and PyTorch
                // take it): weight the maxima by (classes - column) and keep the largest.
                let classes = out.shape()[1];
                let maxima = out.eq_mask(&out.max(1, true)?)?;
                let scored = maxima.broadcast_mul(&first_wins(out.device(), classes)?)?;
                let predicted = scored.eq_mask(&scored.max(1, true)?)?;
                Some(predicted.mul(&Tensor::one_hot(targets, classes)?)?.sum_all()?)
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

/// [classes, classes - 1, ..., 1] as a [1, classes] tensor on `device`, made once per device and width (no
/// upload per training step; kept for the life of the process, a few floats per device and width).
fn first_wins(device: &kiln_graph::backend::Device, classes: usize) -> Result<Tensor> {
    static CACHE: std::sync::Mutex<Vec<(kiln_graph::backend::Device, usize, Tensor)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, t)) = cache.iter().find(|(d, c, _)| d == device && *c == classes) {
        return Ok(t.clone());
    }
    let weights: Vec<f32> = (0..classes).map(|j| (classes - j) as f32).collect();
    let t = Tensor::from_slice_on(device, &weights, &[1, classes])?;
    cache.push((device.clone(), classes, t.clone()));
    Ok(t)
}

/// A network with its task.
pub struct Model {
    pub net: Sequential,
    pub task: Task,
    pub outputs: usize,
}

/// A single linear layer (zero-initialised, as the course starts gradient descent) with `task_for(classes)`
/// choosing its task and width: linear, polynomial, logistic and softmax regression.
pub fn build_linear(vs: &mut VarStore, data: &ArrayDataset, task_for: fn(Option<usize>) -> (Task, usize)) -> Result<Model> {
    let (task, outputs) = task_for(data.num_classes());
    let net = Sequential::new().push(Linear::new(vs, "linear", data.features, outputs, Init::Zeros)?);
    Ok(Model { net, task, outputs })
}

/// Regression for real targets, else softmax over the classes (linreg and polyreg on a classification set).
pub fn regression_or_softmax(classes: Option<usize>) -> (Task, usize) {
    match classes {
        None => (Task::Regression, 1),
        Some(k) => (Task::Softmax, k),
    }
}

/// Binary logistic regression for two classes, one-vs-all for more.
pub fn logistic(classes: Option<usize>) -> (Task, usize) {
    match classes {
        Some(2) => (Task::Binary, 1),
        Some(k) => (Task::OneVsAll, k),
        None => (Task::Regression, 1),
    }
}

/// The multi-layer perceptron: `arch.hidden` ReLU layers (He init), then a linear head.
pub fn build_mlp(vs: &mut VarStore, data: &ArrayDataset, arch: &Arch) -> Result<Model> {
    let (task, outputs) = regression_or_softmax(data.num_classes());
    let mut net = Sequential::new();
    let mut width = data.features;
    for (i, &h) in arch.hidden.iter().enumerate() {
        net = net.push(Linear::new(vs, &format!("fc{}", i + 1), width, h, Init::HeNormal)?).push(Activation::Relu);
        width = h;
    }
    net = net.push(Linear::new(vs, &format!("fc{}", arch.hidden.len() + 1), width, outputs, Init::XavierUniform)?);
    Ok(Model { net, task, outputs })
}

/// A convolutional classifier: rows unflattened to the data set's images, then `body(vs, image, classes)`.
pub fn build_image_classifier(vs: &mut VarStore, data: &ArrayDataset, name: &str, body: impl FnOnce(&mut VarStore, [usize; 3], usize) -> Result<Sequential>) -> Result<Model> {
    let (Some(img), Some(k)) = (data.image, data.num_classes()) else {
        return Err(kiln_graph::KilnError::Invalid { op: "build", shape: vec![data.features], message: format!("{name} needs an image classification data set (mnist, fashion-mnist, digits)") });
    };
    let net = body(vs, img, k)?.into_iter().fold(Sequential::new().push(kiln_nn::Unflatten(img)), |n, l| n.push_boxed(l));
    Ok(Model { net, task: Task::Softmax, outputs: k })
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
// Index loops read as the algebra they implement.
#[allow(clippy::needless_range_loop)]
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
