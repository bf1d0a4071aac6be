//! Modules beyond one tensor in, one out: an LSTM cell carrying (h, c) between steps (against an f64 reference
//! and finite differences, unrolled over three steps), and a two-input siamese model; parameter traversal.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::Tensor;
use kiln_nn::{lstm_cell, Activation, Dropout, Init, Layer, Linear, LstmCell, LstmState, Module, Sequential, VarStore};
use kiln_tests::{check_op, require_gpu, Domain};

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// PyTorch's LSTMCell in f64: gates in the order input, forget, cell, output.
fn lstm_reference(x: &[f64], h: &[f64], c: &[f64], w_ih: &[f64], w_hh: &[f64], b_ih: &[f64], b_hh: &[f64], n: usize, input: usize, hidden: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut h2, mut c2) = (vec![0.0; n * hidden], vec![0.0; n * hidden]);
    for s in 0..n {
        let gate = |row: usize| -> f64 {
            let mut v = b_ih[row] + b_hh[row];
            v += (0..input).map(|k| x[s * input + k] * w_ih[row * input + k]).sum::<f64>();
            v + (0..hidden).map(|k| h[s * hidden + k] * w_hh[row * hidden + k]).sum::<f64>()
        };
        for j in 0..hidden {
            let (i, f, g, o) = (sigmoid(gate(j)), sigmoid(gate(hidden + j)), gate(2 * hidden + j).tanh(), sigmoid(gate(3 * hidden + j)));
            c2[s * hidden + j] = f * c[s * hidden + j] + i * g;
            h2[s * hidden + j] = o * c2[s * hidden + j].tanh();
        }
    }
    (h2, c2)
}

#[test]
fn lstm_cell_unrolled_three_steps_matches_reference_and_finite_differences() {
    let (n, input, hidden, steps) = (3, 5, 4, 3);
    let shapes: [&[usize]; 7] = [&[steps, n, input], &[n, hidden], &[n, hidden], &[4 * hidden, input], &[4 * hidden, hidden], &[4 * hidden], &[4 * hidden]];
    let inputs: Vec<(&[usize], Domain)> = shapes.iter().map(|s| (*s, Domain::Any)).collect();
    check_op(
        "lstm_cell x3",
        &inputs,
        |t| {
            let mut state = LstmState { h: t[1].clone(), c: t[2].clone() };
            for step in 0..steps {
                let x = t[0].slice(0, step, 1)?.reshape(&[n, input])?;
                state = lstm_cell(&x, &state, &t[3], &t[4], &t[5], &t[6])?;
            }
            Tensor::concat(&[&state.h, &state.c], 1)
        },
        |t| {
            let (mut h, mut c) = (t[1].data.clone(), t[2].data.clone());
            for step in 0..steps {
                let x = &t[0].data[step * n * input..(step + 1) * n * input];
                (h, c) = lstm_reference(x, &h, &c, &t[3].data, &t[4].data, &t[5].data, &t[6].data, n, input, hidden);
            }
            let data = (0..n).flat_map(|s| h[s * hidden..(s + 1) * hidden].iter().chain(&c[s * hidden..(s + 1) * hidden]).copied().collect::<Vec<_>>()).collect();
            CpuTensor::new(data, &[n, 2 * hidden])
        },
    );
}

#[test]
fn lstm_cell_module_names_counts_and_checks_its_parameters() {
    require_gpu();
    let mut vs = VarStore::new(3);
    let cell = LstmCell::new(&mut vs, "rnn", 10, 20).unwrap();
    vs.finish().unwrap();
    // torch.nn.LSTMCell(10, 20): 4*20*(10+20) + 2*4*20 = 2560 parameters.
    assert_eq!(cell.num_params(), 2560);
    let names: Vec<&str> = cell.params().iter().map(|p| p.name()).collect();
    assert_eq!(names, ["rnn.weight_ih", "rnn.weight_hh", "rnn.bias_ih", "rnn.bias_hh"]);
    let state = cell.zero_state(2).unwrap();
    let x = Tensor::full(&[2, 10], 0.5).unwrap();
    let next = cell.forward(&x, &state).unwrap();
    assert_eq!((next.h.shape(), next.c.shape()), (&[2, 20][..], &[2, 20][..]));
    let err = cell.forward(&Tensor::full(&[2, 7], 0.5).unwrap(), &state).expect_err("a shape error").to_string();
    assert!(err.contains("LSTMCell(10, 20)") && err.contains("[2, 7]"), "{err}");
    let err = cell.forward(&x, &cell.zero_state(3).unwrap()).expect_err("a state shape error").to_string();
    assert!(err.contains("[3, 20]"), "{err}");
}

/// A siamese model: one encoder applied to two inputs, returning their squared distance. Its forward takes
/// two tensors; `Module` gives it traversal, counting and modes.
struct Siamese {
    encoder: Sequential,
}

impl Module for Siamese {
    fn describe(&self) -> String {
        "Siamese".into()
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("encoder".into(), &self.encoder)]
    }
    fn children_mut(&mut self) -> Vec<&mut dyn Module> {
        vec![&mut self.encoder]
    }
}

impl Siamese {
    fn forward(&self, a: &Tensor, b: &Tensor) -> kiln_graph::Result<Tensor> {
        let d = self.encoder.forward(a)?.sub(&self.encoder.forward(b)?)?;
        d.mul(&d)?.sum(&[1], false)
    }
}

#[test]
fn two_input_module_shares_its_encoder_and_trains_it() {
    require_gpu();
    let mut vs = VarStore::new(5);
    let encoder = Sequential::new()
        .push(Linear::new(&mut vs, "enc.0", 6, 8, Init::HeNormal).unwrap())
        .push(Activation::Tanh)
        .push(Dropout::new(0.5, 9).unwrap())
        .push(Linear::new(&mut vs, "enc.3", 8, 3, Init::XavierUniform).unwrap());
    vs.finish().unwrap();
    let mut model = Siamese { encoder };
    // Evaluation mode reaches the dropout inside through children_mut: the same pair, the same distance.
    model.set_training(false);
    let (a, b) = (Tensor::full(&[2, 6], 0.3).unwrap(), Tensor::full(&[2, 6], -0.2).unwrap());
    assert_eq!(model.forward(&a, &b).unwrap().to_vec().unwrap(), model.forward(&a, &b).unwrap().to_vec().unwrap());
    model.set_training(true);
    assert_ne!(model.forward(&a, &b).unwrap().to_vec().unwrap(), model.forward(&a, &b).unwrap().to_vec().unwrap(), "training mode draws new masks");
    assert_eq!(model.num_params(), 6 * 8 + 8 + 8 * 3 + 3);
    assert_eq!(model.params().len(), 4);
    assert!(model.as_layer().is_none());
    let dist = model.forward(&a, &b).unwrap();
    assert_eq!(dist.shape(), &[2]);
    // Both branches' gradients reach the one set of encoder weights; the last bias cancels out of the
    // difference, so its two contributions (+2d and -2d) must sum to exactly zero.
    let grads = dist.sum_all().unwrap().backward().unwrap();
    for p in model.params() {
        let g = grads.get(p.tensor().unwrap()).unwrap_or_else(|| panic!("no gradient for {}", p.name())).to_vec().unwrap();
        if p.name() == "enc.3.bias" {
            assert!(g.iter().all(|v| *v == 0.0), "{}: {g:?}", p.name());
        } else {
            assert!(g.iter().any(|v| *v != 0.0), "{}: zero gradient", p.name());
        }
    }
}
