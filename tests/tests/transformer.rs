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

/// softmax(q k^T / sqrt(d) + mask) v in f64 (the op's CPU reference).
fn attention_reference(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, causal: bool, mask: Option<&[f64]>) -> CpuTensor {
    let (tq, tk) = (q.shape[1], k.shape[1]);
    let mask = mask.map(|m| CpuTensor::new(m.to_vec(), &[tq, tk]));
    kiln_graph::cpu::attention(q, k, v, mask.as_ref(), causal, 1.0 / (q.shape[2] as f64).sqrt(), None)
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
    // The fused kernels (one and two normalised axes, odd sizes) against the f64 reference.
    for (x, w) in [(vec![3usize, 4, 6], vec![6usize]), (vec![5, 3, 7], vec![3, 7]), (vec![1, 33], vec![33])] {
        check_op(
            &format!("layer_norm {x:?} over {w:?}"),
            &[(&x[..], Domain::Any), (&w[..], Domain::Any), (&w[..], Domain::Any)],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| t[0].layer_norm(&t[1], &t[2], 1e-5),
        );
    }
}

#[test]
fn fused_layer_norm_equals_the_composite_with_gradients_of_gradients() {
    require_gpu();
    let mut rng = kiln_tests::test_rng("fused layer norm");
    let x = Tensor::randn(&[6, 5, 9], 2.0, &mut rng).unwrap().add_scalar(3.0).unwrap().var();
    let (w, b) = (Tensor::randn(&[9], 1.0, &mut rng).unwrap().var(), Tensor::randn(&[9], 1.0, &mut rng).unwrap().var());
    let r = Tensor::randn(&[6, 5, 9], 1.0, &mut rng).unwrap();
    let run = |fused: bool| -> Vec<Vec<f32>> {
        kiln_tests::with_settings_device(|dev| {
            kiln_graph::set_fusion(dev, fused);
            let (x, w, b, r) = (x.to(dev).unwrap().var(), w.to(dev).unwrap().var(), b.to(dev).unwrap().var(), r.to(dev).unwrap());
            let y = x.layer_norm(&w, &b, 1e-5).unwrap();
            let loss = y.mul(&y).unwrap().mul(&r).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let mut v = vec![y.to_vec().unwrap()];
            v.extend([&x, &w, &b].iter().map(|t| g.get(t).unwrap().to_vec().unwrap()));
            // |d loss / d x|^2 differentiated by w: through the composite under backward_create_graph.
            let gx = loss.backward_create_graph().unwrap().get(&x).unwrap().clone();
            v.push(gx.mul(&gx).unwrap().sum_all().unwrap().backward().unwrap().get(&w).unwrap().to_vec().unwrap());
            v
        })
    };
    let (fused, composite) = (run(true), run(false));
    for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
        kiln_tests::assert_close(&format!("layer norm result {i}"), a, &b.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-4);
    }
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

/// The fused (flash-style) kernels on sizes that cross their tiles (more than 64 queries, key tiles cut short),
/// head sizes of 5 and 7, a per-batch padding mask and dropout, against the f64 reference and finite
/// differences of q, k and v.
#[test]
fn fused_attention_matches_the_reference_across_tiles_with_masks_and_dropout() {
    let (b, tq, tk, d, dv) = (2, 70, 37, 5, 7);
    let cross: [&[usize]; 3] = [&[b, tq, d], &[b, tk, d], &[b, tk, dv]];
    let inputs: Vec<(&[usize], Domain)> = cross.iter().map(|s| (*s, Domain::Any)).collect();
    // Sequence 0 sees every key, sequence 1 the first 20 (padding).
    let mask: Vec<f64> = (0..b * tq * tk).map(|e| if e / (tq * tk) == 1 && e % tk >= 20 { -1e9 } else { 0.0 }).collect();
    let mask_cpu = CpuTensor::new(mask.clone(), &[b, tq, tk]);
    let gm = Tensor::from_slice(&mask.iter().map(|&m| m as f32).collect::<Vec<_>>(), &[b, tq, tk]).unwrap();
    let scale = 0.3;
    for dropout in [None, Some((0.3f32, 77u64))] {
        check_op(
            &format!("fused attention, padding mask, dropout {dropout:?}"),
            &inputs,
            |x| kiln_graph::attention::attention_fused(&x[0], &x[1], &x[2], Some(&gm), false, Some(scale), dropout),
            |x| kiln_graph::cpu::attention(&x[0], &x[1], &x[2], Some(&mask_cpu), false, scale as f64, dropout),
        );
    }
    let self_shapes: [&[usize]; 3] = [&[3, 67, 6], &[3, 67, 6], &[3, 67, 6]];
    let inputs: Vec<(&[usize], Domain)> = self_shapes.iter().map(|s| (*s, Domain::Any)).collect();
    let self_inputs = inputs.clone();
    // Both forward kernels: key tiles in workgroup memory (GPUs) and keys read per row (CPU adapters).
    for tiles in [true, false] {
        kiln_tests::with_settings_device(|dev| {
            dev.set_setting("attention_tiles", Some(tiles as u8));
            check_op(
                &format!("fused causal attention, tiles {tiles}"),
                &inputs,
                |x| kiln_graph::attention::attention_fused(&x[0], &x[1], &x[2], None, true, None, Some((0.1, 5))),
                |x| kiln_graph::cpu::attention(&x[0], &x[1], &x[2], None, true, 1.0 / 6f64.sqrt(), Some((0.1, 5))),
            );
            let gm = gm.to(dev).unwrap();
            let inputs: Vec<(&[usize], Domain)> = cross.iter().map(|s| (*s, Domain::Any)).collect();
            check_op(
                &format!("fused attention with a mask, tiles {tiles}"),
                &inputs,
                |x| kiln_graph::attention::attention_fused(&x[0], &x[1], &x[2], Some(&gm), false, Some(scale), None),
                |x| kiln_graph::cpu::attention(&x[0], &x[1], &x[2], Some(&mask_cpu), false, scale as f64, None),
            );
            // Rows split over dispatches (what CPU adapters do past their loop cap), chunks that cut the
            // tiles: every dispatch after the first resumes from the last one's output and log-sum-exp.
            for chunk in [13, 32] {
                let inputs: Vec<(&[usize], Domain)> = cross.iter().map(|s| (*s, Domain::Any)).collect();
                check_op(
                    &format!("fused attention in chunks of {chunk}, mask and dropout, tiles {tiles}"),
                    &inputs,
                    |x| kiln_graph::attention::attention_fused_chunked(&x[0], &x[1], &x[2], Some(&gm), false, Some(scale), Some((0.3, 77)), chunk),
                    |x| kiln_graph::cpu::attention(&x[0], &x[1], &x[2], Some(&mask_cpu), false, scale as f64, Some((0.3, 77))),
                );
                check_op(
                    &format!("fused causal attention in chunks of {chunk}, tiles {tiles}"),
                    &self_inputs,
                    |x| kiln_graph::attention::attention_fused_chunked(&x[0], &x[1], &x[2], None, true, None, Some((0.1, 5)), chunk),
                    |x| kiln_graph::cpu::attention(&x[0], &x[1], &x[2], None, true, 1.0 / 6f64.sqrt(), Some((0.1, 5))),
                );
            }
        });
    }
    assert!(kiln_graph::attention::attention_fused_chunked(&gm, &gm, &gm, None, false, None, None, 0).is_err(), "a chunk of no keys");
}

/// Fused and composed attention agree (outputs and gradients), and the fused op differentiates twice (through
/// the composite) as the composed one does.
#[test]
fn fused_and_composed_attention_agree_with_gradients_of_gradients() {
    require_gpu();
    let mut rng = kiln_tests::test_rng("fused attention vs composed");
    let (b, t, d) = (4, 90, 16);
    let q = Tensor::randn(&[b, t, d], 1.0, &mut rng).unwrap().var();
    let k = Tensor::randn(&[b, t, d], 1.0, &mut rng).unwrap().var();
    let v = Tensor::randn(&[b, t, d], 1.0, &mut rng).unwrap().var();
    let r = Tensor::randn(&[b, t, d], 1.0, &mut rng).unwrap();
    let run = |fused: bool| -> Vec<Vec<f32>> {
        let f = if fused { kiln_graph::attention::attention_fused } else { kiln_graph::attention::attention_composed };
        let o = f(&q, &k, &v, None, true, None, Some((0.2, 9))).unwrap();
        let loss = o.mul(&r).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let mut out = vec![o.to_vec().unwrap()];
        out.extend([&q, &k, &v].iter().map(|t| g.get(t).unwrap().to_vec().unwrap()));
        let gq = loss.backward_create_graph().unwrap().get(&q).unwrap().clone();
        out.push(gq.mul(&gq).unwrap().sum_all().unwrap().backward().unwrap().get(&k).unwrap().to_vec().unwrap());
        out
    };
    let (fused, composed) = (run(true), run(false));
    for (i, (a, c)) in fused.iter().zip(&composed).enumerate() {
        assert_close(&format!("attention result {i}"), a, &c.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-4);
    }
}

/// The decoder-only Transformer of char-transformer and the reversal task: its names, causality (changing a
/// later token leaves the earlier positions' logits alone) and a sequence longer than its positional table.
#[test]
fn decoder_only_transformer_is_causal_and_refuses_sequences_past_its_positions() {
    use kiln_models::transformer::{TransformerLm, TransformerLmShape};
    require_gpu();
    let mut vs = VarStore::new(5);
    let shape = TransformerLmShape { vocab: 11, d_model: 16, heads: 2, layers: 2, feedforward: 32, max_len: 9 };
    let lm = TransformerLm::new(&mut vs, shape).unwrap();
    vs.finish().unwrap();
    let names: Vec<String> = lm.params().iter().map(|p| p.name().to_string()).collect();
    for want in ["embed.weight", "pos.weight", "blocks.0.self_attn.in_proj_weight", "blocks.1.linear2.bias", "norm.weight", "head.weight"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    let a = [1u32, 4, 2, 9, 3, 3, 7];
    let mut b = a;
    b[5] = 10;
    let logits = |ids: &[u32]| lm.forward(&Tensor::from_u32(ids, &[1, ids.len()]).unwrap()).unwrap().to_vec().unwrap();
    let (la, lb) = (logits(&a), logits(&b));
    assert_eq!(la[..5 * 11], lb[..5 * 11], "positions before the change must not see it");
    assert_ne!(la[5 * 11..], lb[5 * 11..]);
    let err = lm.forward(&Tensor::from_u32(&[1; 10], &[1, 10]).unwrap()).expect_err("10 tokens, 9 positions");
    assert!(err.to_string().contains("positional table of 9"), "{err}");
}

/// Bahdanau's additive and Luong's multiplicative (general) attention for seq2seq against f64 references and
/// finite differences of the queries, keys and values, with a padding mask over the keys.
#[test]
fn additive_and_multiplicative_attention_match_their_formulas() {
    use kiln_nn::{key_padding_mask, AdditiveAttention, MultiplicativeAttention};
    require_gpu();
    let (n, tq, s, dq, dk, dv, a) = (2, 3, 5, 4, 6, 3, 7);
    let mut vs = VarStore::new(11);
    let add = AdditiveAttention::new(&mut vs, "add", dq, dk, a).unwrap();
    let mul = MultiplicativeAttention::general(&mut vs, "mul", dq, dk).unwrap();
    vs.finish().unwrap();
    let host = |p: &kiln_nn::Param| p.tensor().unwrap().to_vec().unwrap().iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (wq, wk, v, wa) = (host(&add.query), host(&add.key), host(&add.v), host(&mul.weight.as_ref().unwrap().clone()));
    let lengths = [5usize, 2];
    let mask = key_padding_mask(&kiln_graph::backend::Device::current().unwrap(), &lengths, tq, s).unwrap();
    let shapes: [&[usize]; 3] = [&[n, tq, dq], &[n, s, dk], &[n, s, dv]];
    let inputs: Vec<(&[usize], Domain)> = shapes.iter().map(|sh| (*sh, Domain::Any)).collect();
    // softmax over the unmasked keys of score(i, j), then the weighted values.
    let reference = |q: &CpuTensor, k: &CpuTensor, val: &CpuTensor, score: &dyn Fn(&[f64], &[f64]) -> f64| {
        let mut out = vec![0.0; n * tq * dv];
        for b in 0..n {
            for i in 0..tq {
                let qi = &q.data[(b * tq + i) * dq..(b * tq + i + 1) * dq];
                let sc: Vec<f64> = (0..lengths[b]).map(|j| score(qi, &k.data[(b * s + j) * dk..(b * s + j + 1) * dk])).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for c in 0..dv {
                    out[(b * tq + i) * dv + c] = (0..lengths[b]).map(|j| (sc[j] - m).exp() / z * val.data[(b * s + j) * dv + c]).sum();
                }
            }
        }
        CpuTensor::new(out, &[n, tq, dv])
    };
    let additive = |qi: &[f64], kj: &[f64]| (0..a).map(|r| v[r] * ((0..dq).map(|c| wq[r * dq + c] * qi[c]).sum::<f64>() + (0..dk).map(|c| wk[r * dk + c] * kj[c]).sum::<f64>()).tanh()).sum::<f64>();
    check_op("additive attention", &inputs, |x| add.forward(&x[0], &x[1], &x[2], Some(&mask)).map(|r| r.0), |x| reference(&x[0], &x[1], &x[2], &additive));
    let general = |qi: &[f64], kj: &[f64]| (0..dq).map(|r| qi[r] * (0..dk).map(|c| wa[r * dk + c] * kj[c]).sum::<f64>()).sum::<f64>();
    check_op("multiplicative attention", &inputs, |x| mul.context(&x[0], &mul.project_keys(&x[1])?, &x[2], Some(&mask)), |x| reference(&x[0], &x[1], &x[2], &general));
}

/// nn.TransformerDecoderLayer's names and count, its post-norm form against the composition of its parts
/// (causal self-attention, cross-attention over the memory with a padding mask, feed-forward), and causality.
#[test]
fn decoder_layer_has_pytorchs_names_and_composes_its_parts() {
    use kiln_nn::{Activation, TransformerDecoderLayer};
    require_gpu();
    let mut vs = VarStore::new(8);
    let dec = TransformerDecoderLayer::new(&mut vs, "dec", 8, 2, 16, Activation::Relu, false).unwrap();
    let pre = TransformerDecoderLayer::new(&mut vs, "pre", 8, 2, 16, Activation::Gelu, true).unwrap();
    vs.finish().unwrap();
    // nn.TransformerDecoderLayer(d_model=8, nhead=2, dim_feedforward=16): 600 + 288 (cross-attention) + 16
    // (norm3) values.
    assert_eq!(dec.num_params(), 904);
    let names: Vec<&str> = dec.params().iter().map(|p| p.name()).collect();
    for want in ["dec.multihead_attn.in_proj_weight", "dec.multihead_attn.out_proj.bias", "dec.norm3.weight", "dec.linear2.weight"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let mut rng = kiln_graph::Rng::new(9);
    let x = Tensor::randn(&[2, 4, 8], 1.0, &mut rng).unwrap().var();
    let memory = Tensor::randn(&[2, 6, 8], 1.0, &mut rng).unwrap().var();
    // The memory's last two positions are padding for every query (a [t, s] mask).
    let hide: Vec<f32> = (0..4 * 6).map(|i| if i % 6 >= 4 { -1e9 } else { 0.0 }).collect();
    let mask = Tensor::from_slice(&hide, &[4, 6]).unwrap();
    let h1 = dec.norm1.forward(&x.add(&dec.self_attn.forward(&x, &x, &x, None, true).unwrap()).unwrap()).unwrap();
    let h2 = dec.norm2.forward(&h1.add(&dec.multihead_attn.forward(&h1, &memory, &memory, Some(&mask), false).unwrap()).unwrap()).unwrap();
    let ff = dec.linear2.forward(&dec.linear1.forward(&h2.reshape(&[8, 8]).unwrap()).unwrap().relu().unwrap()).unwrap().reshape(&[2, 4, 8]).unwrap();
    let want = dec.norm3.forward(&h2.add(&ff).unwrap()).unwrap().to_vec().unwrap();
    let got = dec.forward(&x, &memory, true, Some(&mask)).unwrap();
    assert_close("post-norm decoder layer", &got.to_vec().unwrap(), &want.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-5);
    // Padded memory positions change nothing; a later target position changes no earlier output.
    let mut mem2 = memory.to_vec().unwrap();
    mem2[5 * 8] += 3.0;
    let mem2 = Tensor::from_slice(&mem2, &[2, 6, 8]).unwrap();
    assert_eq!(dec.forward(&x, &mem2, true, Some(&mask)).unwrap().to_vec().unwrap(), got.to_vec().unwrap());
    let mut x2 = x.to_vec().unwrap();
    x2[3 * 8] += 1.0;
    let y2 = pre.forward(&Tensor::from_slice(&x2, &[2, 4, 8]).unwrap(), &memory, true, None).unwrap().to_vec().unwrap();
    let y1 = pre.forward(&x, &memory, true, None).unwrap().to_vec().unwrap();
    assert_eq!(y1[..3 * 8], y2[..3 * 8], "positions 0-2 do not see position 3");
    let grads = got.sum_all().unwrap().backward().unwrap();
    for p in dec.params() {
        assert!(grads.get(p.tensor().unwrap()).is_some(), "no gradient for {}", p.name());
    }
    assert!(dec.forward(&x, &Tensor::zeros(&[2, 6, 5]).unwrap(), true, None).is_err(), "a memory of another width");
}

/// A row longer than a CPU adapter's loop cap (lavapipe ends an invocation's loops after 65535 iterations in
/// all; 600 keys of head size 64 pass it) runs fused in chunks of keys (`attention_chunk`: 272 there, one
/// dispatch on GPUs), never cut short: the output against the f64 reference and the gradients of q, k and v
/// against the composed form, causal and not.
#[test]
fn long_attention_runs_fused_in_chunks_past_the_loop_cap() {
    let gpu = require_gpu();
    let mut rng = kiln_tests::test_rng("long attention");
    let (t, d) = (600, 64);
    let chunk = kiln_graph::attention::attention_chunk(gpu, d, d);
    if gpu.info.device_type == kiln_graph::backend::wgpu::DeviceType::Cpu {
        assert!(chunk < t, "600 keys pass the loop cap: {chunk} keys per dispatch");
    }
    let q = Tensor::randn(&[1, t, d], 1.0, &mut rng).unwrap().var();
    let k = Tensor::randn(&[1, t, d], 1.0, &mut rng).unwrap().var();
    let v = Tensor::randn(&[1, t, d], 1.0, &mut rng).unwrap().var();
    let r = Tensor::randn(&[1, t, d], 1.0, &mut rng).unwrap();
    let one = |x: &Tensor| CpuTensor::from_f32(&x.to_vec().unwrap(), &[1, t, d]);
    for causal in [false, true] {
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let f = if fused { kiln_graph::attention::attention_fused } else { kiln_graph::attention::attention_composed };
            let o = f(&q, &k, &v, None, causal, None, None).unwrap();
            let g = o.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![o.to_vec().unwrap()];
            out.extend([&q, &k, &v].iter().map(|t| g.get(t).unwrap().to_vec().unwrap()));
            out
        };
        let (fused, composed) = (run(true), run(false));
        let want = kiln_graph::cpu::attention(&one(&q), &one(&k), &one(&v), None, causal, 1.0 / 8.0, None);
        assert_close(&format!("attention over 600 keys, causal {causal}"), &fused[0], &want.data, 1e-4);
        for (name, (a, c)) in ["dq", "dk", "dv"].iter().zip(fused.iter().zip(&composed).skip(1)) {
            assert_close(&format!("{name} over 600 keys, causal {causal}"), a, &c.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-4);
        }
    }
}
