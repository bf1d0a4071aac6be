//! Transformer building blocks: erf and GELU (exact and tanh), scaled dot-product attention (causal and
//! masked), PyTorch's MultiheadAttention and LayerNorm, against f64 references and finite differences.

use kiln_graph::cpu::{erf, CpuTensor};
use kiln_graph::Tensor;
use kiln_nn::{layer_norm, scaled_dot_product_attention, Layer, LayerNorm, Module, MultiheadAttention, VarStore};
use kiln_tests::{assert_close, check_op, require_gpu, Domain};

fn map(t: &CpuTensor, f: impl Fn(f64) -> f64) -> CpuTensor {
    CpuTensor::new(t.data.iter().map(|&v| f(v)).collect(), &t.shape)
}

#[test]
fn erf_and_gelu_match_their_definitions() {
    check_op("erf", &[(&[7, 33], Domain::Any)], |t| t[0].erf(), |t| map(&t[0], erf));
    check_op("gelu", &[(&[129], Domain::Any)], |t| t[0].gelu(), |t| map(&t[0], |v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()))));
    let k = (2.0 / std::f64::consts::PI).sqrt();
    check_op("gelu_tanh", &[(&[33], Domain::Any)], |t| t[0].gelu_tanh(), |t| map(&t[0], |v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())));
    assert!((erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15 && erf(-7.0) == -1.0);
}

/// softmax(q k^T / sqrt(d) + mask) v in f64, per batch.
fn attention_reference(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, causal: bool, mask: Option<&[f64]>) -> CpuTensor {
    let (b, tq, d) = (q.shape[0], q.shape[1], q.shape[2]);
    let (tk, dv) = (k.shape[1], v.shape[2]);
    let mut out = vec![0.0; b * tq * dv];
    for bi in 0..b {
        for i in 0..tq {
            let scores: Vec<f64> = (0..tk)
                .map(|j| {
                    let dot: f64 = (0..d).map(|c| q.data[(bi * tq + i) * d + c] * k.data[(bi * tk + j) * d + c]).sum();
                    let hidden = if causal && j > i { -1e9 } else { 0.0 };
                    dot / (d as f64).sqrt() + hidden + mask.map(|m| m[i * tk + j]).unwrap_or(0.0)
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = w.iter().sum();
            for c in 0..dv {
                out[(bi * tq + i) * dv + c] = (0..tk).map(|j| w[j] / z * v.data[(bi * tk + j) * dv + c]).sum();
            }
        }
    }
    CpuTensor::new(out, &[b, tq, dv])
}

#[test]
fn scaled_dot_product_attention_matches_the_reference_causal_and_masked() {
    let (b, t, d) = (3, 5, 4);
    let shapes: [&[usize]; 3] = [&[b, t, d], &[b, t, d], &[b, t, 3]];
    let inputs: Vec<(&[usize], Domain)> = shapes.iter().map(|s| (*s, Domain::Any)).collect();
    check_op("attention", &inputs, |x| scaled_dot_product_attention(&x[0], &x[1], &x[2], None, false), |x| attention_reference(&x[0], &x[1], &x[2], false, None));
    check_op("causal attention", &inputs, |x| scaled_dot_product_attention(&x[0], &x[1], &x[2], None, true), |x| attention_reference(&x[0], &x[1], &x[2], true, None));
    // A padding mask: the last two keys hidden.
    let mask: Vec<f64> = (0..t * t).map(|i| if i % t >= 3 { -1e9 } else { 0.0 }).collect();
    let gm = Tensor::from_slice(&mask.iter().map(|&m| m as f32).collect::<Vec<_>>(), &[t, t]).unwrap();
    check_op("masked attention", &inputs, |x| scaled_dot_product_attention(&x[0], &x[1], &x[2], Some(&gm), false), |x| attention_reference(&x[0], &x[1], &x[2], false, Some(&mask)));
}

#[test]
fn layer_norm_matches_the_reference_and_finite_differences() {
    check_op(
        "layer_norm",
        &[(&[3, 4, 6], Domain::Any), (&[6], Domain::Any), (&[6], Domain::Any)],
        |x| layer_norm(&x[0], &x[1], &x[2], 1e-5),
        |x| {
            let mut out = x[0].data.clone();
            for row in out.chunks_mut(6) {
                let mean = row.iter().sum::<f64>() / 6.0;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0;
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (*v - mean) / (var + 1e-5).sqrt() * x[1].data[j] + x[2].data[j];
                }
            }
            CpuTensor::new(out, &x[0].shape)
        },
    );
}

#[test]
fn multihead_attention_has_pytorchs_layout_and_one_head_is_plain_attention() {
    require_gpu();
    let mut vs = VarStore::new(3);
    let mha = MultiheadAttention::new(&mut vs, "attn", 8, 2, true).unwrap();
    let one = MultiheadAttention::new(&mut vs, "one", 8, 1, true).unwrap();
    let ln = LayerNorm::new(&mut vs, "ln", &[8]).unwrap();
    vs.finish().unwrap();
    let names: Vec<&str> = mha.params().iter().map(|p| p.name()).collect();
    assert_eq!(names, ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]);
    assert_eq!(mha.num_params(), 3 * 8 * 8 + 3 * 8 + 8 * 8 + 8, "nn.MultiheadAttention(8, 2)'s count");
    let x = Tensor::randn(&[2, 5, 8], 1.0, &mut kiln_graph::Rng::new(4)).unwrap();
    let y = mha.forward(&x, &x, &x, None, false).unwrap();
    assert_eq!(y.shape(), &[2, 5, 8]);
    // One head is the projections around plain attention.
    let w = one.in_proj_weight.tensor().unwrap();
    let proj = |part: usize| x.reshape(&[10, 8]).unwrap().matmul_t(&w.slice(0, part * 8, 8).unwrap(), false, true).unwrap().reshape(&[2, 5, 8]).unwrap();
    let att = scaled_dot_product_attention(&proj(0), &proj(1), &proj(2), None, true).unwrap();
    let want = att.reshape(&[10, 8]).unwrap().matmul_t(one.out_weight.tensor().unwrap(), false, true).unwrap().to_vec().unwrap();
    let got = one.forward(&x, &x, &x, None, true).unwrap().to_vec().unwrap();
    assert_close("one head", &got, &want.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-5);
    // Causal: changing the last position leaves the earlier outputs alone.
    let mut moved = x.to_vec().unwrap();
    for v in &mut moved[4 * 8..5 * 8] {
        *v += 1.0;
    }
    let x2 = Tensor::from_slice(&moved, &[2, 5, 8]).unwrap();
    let (a, b) = (mha.forward(&x, &x, &x, None, true).unwrap().to_vec().unwrap(), mha.forward(&x2, &x2, &x2, None, true).unwrap().to_vec().unwrap());
    assert_eq!(&a[..4 * 8], &b[..4 * 8], "positions before the change see only earlier keys");
    assert_ne!(&a[4 * 8..5 * 8], &b[4 * 8..5 * 8]);
    // LayerNorm's rows have mean 0 and variance 1 at its initial weights.
    let n = ln.forward(&x).unwrap().to_vec().unwrap();
    for row in n.chunks(8) {
        let mean = row.iter().sum::<f32>() / 8.0;
        assert!(mean.abs() < 1e-5, "{row:?}");
    }
    assert!(mha.forward(&x, &x, &Tensor::full(&[2, 5, 7], 0.0).unwrap(), None, false).is_err());
    assert!(MultiheadAttention::new(&mut VarStore::new(1), "bad", 8, 3, true).is_err());
}

#[test]
fn encoder_layer_has_pytorchs_names_and_composes_its_parts() {
    use kiln_nn::{sinusoidal_positions, Activation, TransformerEncoderLayer};
    require_gpu();
    let mut vs = VarStore::new(5);
    let post = TransformerEncoderLayer::new(&mut vs, "enc", 8, 2, 16, Activation::Relu, false).unwrap();
    let pre = TransformerEncoderLayer::new(&mut vs, "pre", 8, 2, 16, Activation::Gelu, true).unwrap();
    vs.finish().unwrap();
    // nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16): these names, 600 values.
    let names: Vec<&str> = post.params().iter().map(|p| p.name()).collect();
    assert_eq!(
        names,
        [
            "enc.self_attn.in_proj_weight",
            "enc.self_attn.in_proj_bias",
            "enc.self_attn.out_proj.weight",
            "enc.self_attn.out_proj.bias",
            "enc.linear1.weight",
            "enc.linear1.bias",
            "enc.linear2.weight",
            "enc.linear2.bias",
            "enc.norm1.weight",
            "enc.norm1.bias",
            "enc.norm2.weight",
            "enc.norm2.bias"
        ]
    );
    assert_eq!(post.num_params(), 600);
    let pos = sinusoidal_positions(kiln_graph::backend::Device::current().as_ref().unwrap(), 5, 8).unwrap().to_vec().unwrap();
    assert_eq!((pos[0], pos[1], pos[8 + 1]), (0.0, 1.0, 1f32.cos()), "pe[p, 2i] = sin, pe[p, 2i+1] = cos");
    let x = Tensor::randn(&[2, 5, 8], 1.0, &mut kiln_graph::Rng::new(6)).unwrap().var();
    // Post-norm is norm2(h + ff(h)) with h = norm1(x + attn(x)).
    let h = post.norm1.forward(&x.add(&post.self_attn.forward(&x, &x, &x, None, false).unwrap()).unwrap()).unwrap();
    let ff = post.linear2.forward(&post.linear1.forward(&h.reshape(&[10, 8]).unwrap()).unwrap().relu().unwrap()).unwrap().reshape(&[2, 5, 8]).unwrap();
    let want = post.norm2.forward(&h.add(&ff).unwrap()).unwrap().to_vec().unwrap();
    let got = post.forward(&x, None, false).unwrap();
    assert_close("post-norm layer", &got.to_vec().unwrap(), &want.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-5);
    // Every parameter and the input get a gradient, through both forms.
    let total = got.sum_all().unwrap().add(&pre.forward(&x, None, true).unwrap().powf(2.0).unwrap().sum_all().unwrap()).unwrap();
    let grads = total.backward().unwrap();
    for p in post.params().into_iter().chain(pre.params()) {
        assert!(grads.get(p.tensor().unwrap()).is_some(), "no gradient for {}", p.name());
    }
    assert!(grads.get(&x).unwrap().to_vec().unwrap().iter().any(|v| *v != 0.0));
}
