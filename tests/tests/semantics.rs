//! Semantics checked against PyTorch's: ties in max and in accuracy, activations at large inputs, backward of a
//! non-scalar.

use kiln_graph::Tensor;
use kiln_models::Task;
use kiln_tests::require_gpu;

#[test]
fn max_backward_splits_the_gradient_among_ties() {
    require_gpu();
    // torch.amax(x, dim=1).sum().backward(): ties share the gradient evenly.
    let x = Tensor::from_slice(&[1.0, 3.0, 3.0, 2.0, 5.0, 0.0, 5.0, 5.0], &[2, 4]).unwrap().var();
    let g = x.max(1, false).unwrap().sum_all().unwrap().backward().unwrap();
    let third = 1.0 / 3.0;
    assert_eq!(g.get(&x).unwrap().to_vec().unwrap(), [0.0, 0.5, 0.5, 0.0, third, 0.0, third, third]);
    let g = x.max(0, true).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(&x).unwrap().to_vec().unwrap(), [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
}

#[test]
fn accuracy_counts_a_tie_as_its_first_class_only() {
    require_gpu();
    // Zero logits (a zero-initialised linear model): argmax picks class 0, as PyTorch's argmax does.
    let labels = Tensor::from_u32(&[0, 1, 2, 0, 2], &[5]).unwrap();
    let zeros = Tensor::full(&[5, 3], 0.0).unwrap();
    for task in [Task::Softmax, Task::OneVsAll] {
        assert_eq!(task.correct(&zeros, &labels).unwrap().unwrap().to_scalar().unwrap(), 2.0, "{task:?}");
    }
    // A tie between classes 1 and 2 goes to 1.
    let out = Tensor::from_slice(&[0.0, 2.0, 2.0, 1.0, 0.0, 1.0], &[2, 3]).unwrap();
    let labels = Tensor::from_u32(&[1, 2], &[2]).unwrap();
    assert_eq!(Task::Softmax.correct(&out, &labels).unwrap().unwrap().to_scalar().unwrap(), 1.0);
    // Binary: a zero logit predicts class 1 (p = 0.5), as `predict` does.
    let binary = Tensor::from_u32(&[1, 0, 1], &[3]).unwrap();
    let z = Tensor::full(&[3, 1], 0.0).unwrap();
    assert_eq!(Task::Binary.correct(&z, &binary).unwrap().unwrap().to_scalar().unwrap(), 2.0);
    assert_eq!(Task::Binary.predict(&[0.0, -0.1, 0.1], 1), [1, 0, 1]);
}

#[test]
fn activations_and_their_gradients_are_finite_and_right_at_large_inputs() {
    require_gpu();
    let xs = [-1e4f32, -100.0, -30.0, 30.0, 100.0, 1e4];
    let x = Tensor::from_slice(&xs, &[6]).unwrap().var();
    let check = |name: &str, y: Tensor, want: &[f64], dwant: &[f64]| {
        let got = y.to_vec().unwrap();
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(g.is_finite() && (g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "{name}({}) = {g}, want {w}", xs[i]);
        }
        let d = y.sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec().unwrap();
        for (i, (&g, &w)) in d.iter().zip(dwant).enumerate() {
            assert!(g.is_finite() && (g as f64 - w).abs() <= 1e-6, "d{name}({}) = {g}, want {w}", xs[i]);
        }
    };
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let tanh_want: Vec<f64> = xs.iter().map(|&v| (v as f64).tanh()).collect();
    check("tanh", x.tanh().unwrap(), &tanh_want, &[0.0; 6]);
    let sig_want: Vec<f64> = xs.iter().map(|&v| sig(v as f64)).collect();
    check("sigmoid", x.sigmoid().unwrap(), &sig_want, &[0.0; 6]);
    let sp_want: Vec<f64> = xs.iter().map(|&v| (v as f64).max(0.0) + (1.0 + (-(v as f64).abs()).exp()).ln()).collect();
    let sp_grad: Vec<f64> = xs.iter().map(|&v| sig(v as f64)).collect();
    check("softplus", x.softplus().unwrap(), &sp_want, &sp_grad);
}

#[test]
fn backward_of_a_non_scalar_needs_its_gradient() {
    require_gpu();
    let x = Tensor::from_slice(&[1.0, -2.0, 3.0], &[3]).unwrap().var();
    let y = x.mul(&x).unwrap();
    let err = y.backward().err().expect("an error, not a gradient seeded with ones").to_string();
    assert!(err.contains("not a scalar") && err.contains("backward_from"), "{err}");
    // PyTorch's y.backward(gradient=v): x.grad = 2 x v.
    let v = Tensor::from_slice(&[1.0, 0.5, 2.0], &[3]).unwrap();
    assert_eq!(y.backward_from(&v).unwrap().get(&x).unwrap().to_vec().unwrap(), [2.0, -2.0, 12.0]);
    let wrong = y.backward_from(&Tensor::from_slice(&[1.0, 1.0], &[2]).unwrap()).err().expect("a shape error").to_string();
    assert!(wrong.contains("[3]") && wrong.contains("[2]"), "{wrong}");
}
