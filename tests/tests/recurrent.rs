//! nn.RNN / nn.LSTM / nn.GRU as PyTorch defines them: stacked and bidirectional layers against an f64 reference
//! written from PyTorch's equations, every input's and weight's gradient against finite differences, and the
//! module's names, shapes and parameter counts.

use kiln_graph::cpu::CpuTensor;
use kiln_graph::Tensor;
use kiln_nn::{rnn_forward, CellKind, Module, Rnn, RnnConfig, RnnState, RnnWeights, VarStore};
use kiln_tests::{check_op, require_gpu, Domain};

/// The stacked, bidirectional RNN in f64, PyTorch's way (each layer and direction by the op's f64 reference): outputs [t, n, D*H], h_n and c_n [L*D, n, H].
#[allow(clippy::too_many_arguments)]
fn reference(kind: CellKind, x: &[f64], steps: usize, n: usize, input: usize, hidden: usize, h0: &[f64], c0: &[f64], weights: &[[Vec<f64>; 4]], dirs: usize) -> Vec<f64> {
    let layers = weights.len() / dirs;
    let mut inp = x.to_vec();
    let mut in_size = input;
    let (mut h_n, mut c_n) = (Vec::new(), Vec::new());
    for layer in 0..layers {
        let mut out = vec![0.0; steps * n * dirs * hidden];
        for d in 0..dirs {
            let k = layer * dirs + d;
            // Every step's input projection, then the layer's pass (the reference of rnn_sequence).
            let g = kind.gates() * hidden;
            let w = &weights[k];
            let xg: Vec<f64> = (0..steps * n * g).map(|i| w[2][i % g] + (0..in_size).map(|j| w[0][(i % g) * in_size + j] * inp[(i / g) * in_size + j]).sum::<f64>()).collect();
            let state = |v: &[f64]| CpuTensor::new(v[k * n * hidden..(k + 1) * n * hidden].to_vec(), &[n, hidden]);
            let c0k = (kind == CellKind::Lstm).then(|| state(c0));
            let (outs, h, c) = kiln_graph::cpu::rnn_sequence(
                kind,
                &CpuTensor::new(xg, &[steps * n, g]),
                &CpuTensor::new(w[1].clone(), &[g, hidden]),
                &CpuTensor::new(w[3].clone(), &[g]),
                &state(h0),
                c0k.as_ref(),
                None,
                d == 1,
            );
            for t in 0..steps {
                for s in 0..n {
                    for j in 0..hidden {
                        out[(t * n + s) * dirs * hidden + d * hidden + j] = outs.data[(t * n + s) * hidden + j];
                    }
                }
            }
            let (h, c) = (h.data, c.map(|c| c.data).unwrap_or_default());
            h_n.extend(h);
            c_n.extend(c);
        }
        inp = out;
        in_size = dirs * hidden;
    }
    let mut all = inp;
    all.extend(h_n);
    if kind == CellKind::Lstm {
        all.extend(c_n);
    }
    all
}

fn check_rnn(kind: CellKind, layers: usize, dirs: usize) {
    let (steps, n, input, hidden) = (3, 2, 3, 2);
    let g = kind.gates() * hidden;
    // x, h0, c0 (an LSTM's only), then each layer's and direction's four weights.
    let lstm = kind == CellKind::Lstm;
    let first_weight = if lstm { 3 } else { 2 };
    let mut shapes: Vec<Vec<usize>> = vec![vec![steps, n, input], vec![layers * dirs, n, hidden]];
    if lstm {
        shapes.push(vec![layers * dirs, n, hidden]);
    }
    for layer in 0..layers {
        let in_size = if layer == 0 { input } else { dirs * hidden };
        for _ in 0..dirs {
            shapes.extend([vec![g, in_size], vec![g, hidden], vec![g], vec![g]]);
        }
    }
    let inputs: Vec<(&[usize], Domain)> = shapes.iter().map(|s| (&s[..], Domain::Any)).collect();
    let name = format!("{kind:?} layers {layers} directions {dirs}");
    check_op(
        &name,
        &inputs,
        |t| {
            let weights: Vec<RnnWeights> = t[first_weight..].chunks(4).map(|w| RnnWeights { w_ih: w[0].clone(), w_hh: w[1].clone(), b_ih: w[2].clone(), b_hh: w[3].clone() }).collect();
            let c = lstm.then(|| t[2].clone());
            let (out, state) = rnn_forward(kind, &t[0], Some(&RnnState { h: t[1].clone(), c }), &weights, dirs, &|x| Ok(x.clone()))?;
            let mut parts = vec![out.reshape(&[out.numel()])?, state.h.reshape(&[state.h.numel()])?];
            if let Some(c) = state.c {
                parts.push(c.reshape(&[c.numel()])?);
            }
            Tensor::concat(&parts.iter().collect::<Vec<_>>(), 0)
        },
        |t| {
            let weights: Vec<[Vec<f64>; 4]> = t[first_weight..].chunks(4).map(|w| [w[0].data.clone(), w[1].data.clone(), w[2].data.clone(), w[3].data.clone()]).collect();
            let c0 = if lstm { t[2].data.clone() } else { vec![0.0; t[1].data.len()] };
            let all = reference(kind, &t[0].data, steps, n, input, hidden, &t[1].data, &c0, &weights, dirs);
            let len = all.len();
            CpuTensor::new(all, &[len])
        },
    );
}

#[test]
fn lstm_two_layers_bidirectional_matches_the_reference_and_finite_differences() {
    check_rnn(CellKind::Lstm, 2, 2);
}

#[test]
fn gru_two_layers_matches_the_reference_and_finite_differences() {
    check_rnn(CellKind::Gru, 2, 1);
}

#[test]
fn tanh_rnn_bidirectional_matches_the_reference_and_finite_differences() {
    check_rnn(CellKind::Tanh, 1, 2);
}

#[test]
fn modules_have_pytorchs_names_shapes_and_counts() {
    require_gpu();
    let mut vs = VarStore::new(1);
    let lstm = Rnn::new(&mut vs, "lstm", CellKind::Lstm, 10, 20, RnnConfig { num_layers: 2, bidirectional: true, ..Default::default() }).unwrap();
    let gru = Rnn::new(&mut vs, "gru", CellKind::Gru, 10, 20, RnnConfig { batch_first: true, ..Default::default() }).unwrap();
    vs.finish().unwrap();
    // torch.nn.LSTM(10, 20, num_layers=2, bidirectional=True) and torch.nn.GRU(10, 20).
    assert_eq!(lstm.num_params(), 15040);
    assert_eq!(gru.num_params(), 1920);
    let names: Vec<&str> = lstm.params().iter().map(|p| p.name()).collect();
    assert_eq!(&names[..5], ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0", "lstm.weight_ih_l0_reverse"]);
    assert_eq!(lstm.params()[12].shape(), [80, 40], "the second layer reads both directions");
    assert_eq!(lstm.params()[12].name(), "lstm.weight_ih_l1_reverse");
    // Shapes through the module: time first, and batch first.
    let x = Tensor::full(&[5, 3, 10], 0.1).unwrap();
    let (out, state) = lstm.forward(&x, None).unwrap();
    assert_eq!((out.shape(), state.h.shape(), state.c.as_ref().unwrap().shape()), (&[5, 3, 40][..], &[4, 3, 20][..], &[4, 3, 20][..]));
    let (out, state) = gru.forward(&Tensor::full(&[3, 5, 10], 0.1).unwrap(), None).unwrap();
    assert_eq!((out.shape(), state.h.shape(), state.c.is_none()), (&[3, 5, 20][..], &[1, 3, 20][..], true));
    // Bad input names both shapes.
    let err = lstm.forward(&Tensor::full(&[5, 3, 7], 0.1).unwrap(), None).expect_err("wrong input size").to_string();
    assert!(err.contains("[5, 3, 7]") && err.contains("LSTM(10, 20"), "{err}");
    let bad = RnnState { h: Tensor::full(&[2, 3, 20], 0.0).unwrap(), c: None };
    assert!(lstm.forward(&x, Some(&bad)).is_err());
}

#[test]
fn embedding_gradient_sums_repeated_ids_and_is_deterministic() {
    use kiln_tests::test_rng;
    require_gpu();
    let mut rng = test_rng("embedding");
    // Against the CPU reference and finite differences, with repeated ids.
    let ids: Vec<u32> = (0..40).map(|_| rng.below(11) as u32).collect();
    let gi = Tensor::from_u32(&ids, &[40]).unwrap();
    check_op("embedding [11, 5] x 40 ids", &[(&[11, 5], Domain::Any)], |t| t[0].index_select(0, &gi), |t| t[0].index_select(0, &ids));
    // Many ids, few rows (a character model's batch): against the sum on the host, and bit for bit the same
    // twice (the occurrences are summed in id order whatever the thread timing).
    let (rows, dim, m) = (87, 16, 20_000);
    let ids: Vec<u32> = (0..m).map(|_| rng.below(rows) as u32).collect();
    let g: Vec<f32> = (0..m * dim).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let grad = || {
        let table = Tensor::full(&[rows, dim], 0.5).unwrap().var();
        let picked = table.index_select(0, &Tensor::from_u32(&ids, &[m]).unwrap()).unwrap();
        picked.backward_from(&Tensor::from_slice(&g, &[m, dim]).unwrap()).unwrap().get(&table).unwrap().to_vec().unwrap()
    };
    let (a, b) = (grad(), grad());
    assert_eq!(a, b, "the same gradient bit for bit");
    let mut want = vec![0.0f64; rows * dim];
    for (j, &r) in ids.iter().enumerate() {
        for d in 0..dim {
            want[r as usize * dim + d] += g[j * dim + d] as f64;
        }
    }
    kiln_tests::assert_close("embedding gradient of 20,000 ids", &a, &want, 1e-4);
}

#[test]
fn embedding_layer_pads_with_a_zero_row_that_never_trains() {
    require_gpu();
    let mut vs = VarStore::new(4);
    let emb = kiln_nn::Embedding::new(&mut vs, "emb", 6, 3, Some(0)).unwrap();
    vs.finish().unwrap();
    assert_eq!(emb.describe(), "Embedding(6, 3, padding_idx=0)");
    let ids = Tensor::from_u32(&[2, 0, 5, 0, 2, 1], &[2, 3]).unwrap();
    let out = emb.forward_ids(&ids).unwrap();
    assert_eq!(out.shape(), &[2, 3, 3]);
    let v = out.to_vec().unwrap();
    assert!(v[3..6].iter().chain(&v[9..12]).all(|&x| x == 0.0), "padding rows read zero: {v:?}");
    assert!(v[..3].iter().any(|&x| x != 0.0));
    let grads = out.sum_all().unwrap().backward().unwrap();
    let g = grads.get(emb.weight.tensor().unwrap()).unwrap().to_vec().unwrap();
    assert_eq!(&g[..3], &[0.0, 0.0, 0.0], "the padding row gets no gradient");
    assert_eq!(&g[6..9], &[2.0, 2.0, 2.0], "id 2 appears twice");
    let err = emb.forward_ids(&Tensor::full(&[2], 1.0).unwrap()).expect_err("f32 ids").to_string();
    assert!(err.contains("Embedding") && err.contains("U32"), "{err}");
    assert!(kiln_nn::Embedding::new(&mut VarStore::new(1), "e", 4, 2, Some(4)).is_err());
}

#[test]
fn padding_never_changes_a_result() {
    require_gpu();
    let mut vs = VarStore::new(8);
    let lstm = Rnn::new(&mut vs, "lstm", CellKind::Lstm, 3, 4, RnnConfig { num_layers: 2, bidirectional: true, ..Default::default() }).unwrap();
    let gru = Rnn::new(&mut vs, "gru", CellKind::Gru, 3, 4, RnnConfig { bidirectional: true, ..Default::default() }).unwrap();
    vs.finish().unwrap();
    let mut rng = kiln_graph::Rng::new(12);
    let (steps, lengths) = (5usize, [5usize, 3, 1]);
    let n = lengths.len();
    // Time-major [5, 3, 3]; the padding is random, not zero: it must not matter.
    let x: Vec<f32> = (0..steps * n * 3).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    for rnn in [&lstm, &gru] {
        let (out, state) = rnn.forward_lengths(&Tensor::from_slice(&x, &[steps, n, 3]).unwrap(), Some(&lengths), None).unwrap();
        let (out, h) = (out.to_vec().unwrap(), state.h.to_vec().unwrap());
        let width = 2 * 4;
        for (i, &len) in lengths.iter().enumerate() {
            // The same sequence alone, unpadded.
            let alone: Vec<f32> = (0..len).flat_map(|t| x[(t * n + i) * 3..(t * n + i + 1) * 3].to_vec()).collect();
            let (o1, s1) = rnn.forward(&Tensor::from_slice(&alone, &[len, 1, 3]).unwrap(), None).unwrap();
            let (o1, h1) = (o1.to_vec().unwrap(), s1.h.to_vec().unwrap());
            for t in 0..steps {
                let got = &out[(t * n + i) * width..(t * n + i + 1) * width];
                if t < len {
                    let want: Vec<f64> = o1[t * width..(t + 1) * width].iter().map(|&v| v as f64).collect();
                    kiln_tests::assert_close(&format!("{} sequence {i} step {t}", rnn.describe()), got, &want, 1e-5);
                } else {
                    assert!(got.iter().all(|&v| v == 0.0), "padding outputs are zero: {got:?}");
                }
            }
            let layers_dirs = h.len() / (n * 4);
            for k in 0..layers_dirs {
                let got = &h[(k * n + i) * 4..(k * n + i + 1) * 4];
                let want: Vec<f64> = h1[k * 4..(k + 1) * 4].iter().map(|&v| v as f64).collect();
                kiln_tests::assert_close(&format!("{} final state {k} of sequence {i}", rnn.describe()), got, &want, 1e-5);
            }
        }
    }
    assert!(lstm.forward_lengths(&Tensor::from_slice(&x, &[steps, n, 3]).unwrap(), Some(&[5, 6, 1]), None).is_err(), "a length past the steps");
}

/// The fused pass (kiln_graph::rnn, recurrent.wgsl) on odd sizes against the CPU reference and finite
/// differences: every input's gradient, through the outputs, the final h and the final c.
fn check_sequence(kind: CellKind, lengths: Option<&[usize]>, reverse: bool) {
    let (steps, n, hidden) = (5, 3, 7);
    let gh = kind.gates() * hidden;
    let lstm = kind == CellKind::Lstm;
    let mut shapes: Vec<Vec<usize>> = vec![vec![steps * n, gh], vec![gh, hidden], vec![gh], vec![n, hidden]];
    if lstm {
        shapes.push(vec![n, hidden]);
    }
    let inputs: Vec<(&[usize], Domain)> = shapes.iter().map(|s| (&s[..], Domain::Any)).collect();
    check_op(
        &format!("rnn_sequence {kind:?} lengths {lengths:?} reverse {reverse}"),
        &inputs,
        |t| {
            let s = kiln_graph::rnn::rnn_sequence(kind, &t[0], &t[1], &t[2], &t[3], t.get(4), lengths, reverse)?;
            let mut parts = vec![s.outputs.reshape(&[steps * n * hidden])?, s.h_last.reshape(&[n * hidden])?];
            if let Some(c) = s.c_last {
                parts.push(c.reshape(&[n * hidden])?);
            }
            Tensor::concat(&parts.iter().collect::<Vec<_>>(), 0)
        },
        |t| {
            let (out, h, c) = kiln_graph::cpu::rnn_sequence(kind, &t[0], &t[1], &t[2], &t[3], t.get(4), lengths, reverse);
            let mut all = out.data;
            all.extend(h.data);
            all.extend(c.map(|c| c.data).unwrap_or_default());
            let len = all.len();
            CpuTensor::new(all, &[len])
        },
    );
}

#[test]
fn fused_sequences_match_the_reference_and_finite_differences() {
    for kind in [CellKind::Tanh, CellKind::Lstm, CellKind::Gru] {
        check_sequence(kind, None, false);
        check_sequence(kind, None, true);
        // A sequence of length 0 keeps its initial state throughout.
        check_sequence(kind, Some(&[5, 2, 0]), true);
        check_sequence(kind, Some(&[1, 5, 3]), false);
    }
}

#[test]
fn fused_and_composed_sequences_agree_with_gradients_of_gradients() {
    require_gpu();
    let mut rng = kiln_tests::test_rng("fused_and_composed");
    let (steps, n, hidden) = (12, 5, 33);
    let lengths = [12, 7, 1, 12, 4];
    for kind in [CellKind::Lstm, CellKind::Gru] {
        let gh = kind.gates() * hidden;
        let rand = |shape: &[usize], rng: &mut kiln_graph::Rng| Tensor::rand_uniform(shape, -0.5, 0.5, rng).unwrap().var();
        let (xg, w, b, h0) = (rand(&[steps * n, gh], &mut rng), rand(&[gh, hidden], &mut rng), rand(&[gh], &mut rng), rand(&[n, hidden], &mut rng));
        let c0 = (kind == CellKind::Lstm).then(|| rand(&[n, hidden], &mut rng));
        let r = Tensor::rand_uniform(&[steps, n, hidden], -1.0, 1.0, &mut rng).unwrap();
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let f = if fused { kiln_graph::rnn::rnn_sequence } else { kiln_graph::rnn::rnn_sequence_composed };
            let s = f(kind, &xg, &w, &b, &h0, c0.as_ref(), Some(&lengths), kind == CellKind::Gru).unwrap();
            let mut loss = s.outputs.mul(&r).unwrap().sum_all().unwrap().add(&s.h_last.sum_all().unwrap()).unwrap();
            if let Some(c) = &s.c_last {
                loss = loss.add(&c.mul(c).unwrap().sum_all().unwrap()).unwrap();
            }
            // First-order gradients by the backward rule (the fused kernels when fused) ...
            let g = loss.backward().unwrap();
            let mut vals = vec![s.outputs.to_vec().unwrap()];
            let mut leaves = vec![&xg, &w, &b, &h0];
            leaves.extend(c0.as_ref());
            vals.extend(leaves.iter().map(|t| g.get(t).expect("every input has a gradient").to_vec().unwrap()));
            // ... and a gradient of a gradient (the fused op differentiated through its composite formula):
            // |d loss / d xg|^2 differentiated by w_hh.
            let g = loss.backward_create_graph().unwrap();
            let gx = g.get(&xg).unwrap();
            let gg = gx.mul(gx).unwrap().sum_all().unwrap().backward().unwrap();
            vals.push(gg.get(&w).expect("w_hh reached").to_vec().unwrap());
            vals
        };
        let (fused, composed) = (run(true), run(false));
        for (i, (a, b)) in fused.iter().zip(&composed).enumerate() {
            let want: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            kiln_tests::assert_close(&format!("{kind:?} result {i}"), a, &want, 1e-4);
        }
    }
}
