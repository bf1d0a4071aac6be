//! Convolution and pooling: GPU forward against the CPU reference and every gradient against finite
//! differences, over strides, padding, dilation, groups, the 1x1 matmul path and odd sizes.

use kiln_graph::kernels;
use kiln_graph::{Conv2dGeom, Pool2dGeom, Tensor};
use kiln_tests::{check_op, require_gpu, test_rng, with_settings_device, Domain};

/// Convolutions run through conv_gemm on CPU adapters and im2col + matmul elsewhere: each case runs both ways,
/// on the tests' settings device (the switch is a device setting).
fn conv_case(name: &str, x: [usize; 4], w: [usize; 4], geom: Conv2dGeom) {
    require_gpu();
    with_settings_device(|dev| {
        let implicit = kernels::ConvLowering::Implicit;
        let lowerings =
            if kernels::MatmulVariant::Subgroup(8).supports(dev, 1, 1, 1, false, false).unwrap() { vec![kernels::ConvLowering::Im2col, implicit] } else { vec![kernels::ConvLowering::Im2col] };
        for lowering in lowerings {
            kernels::set_conv_lowering(dev, lowering);
            conv_case_once(&format!("{name} ({lowering:?})"), x, w, geom);
        }
    })
}

fn conv_case_once(name: &str, x: [usize; 4], w: [usize; 4], geom: Conv2dGeom) {
    check_op(&format!("conv2d {name} x{x:?} w{w:?}"), &[(&x, Domain::Any), (&w, Domain::Any)], |t| t[0].conv2d(&t[1], geom), |t| t[0].conv2d(&t[1], &geom));
}

#[test]
fn conv2d_plain_and_padded() {
    conv_case("valid", [2, 3, 7, 7], [4, 3, 3, 3], Conv2dGeom::default());
    conv_case("same", [1, 1, 9, 9], [2, 1, 5, 5], Conv2dGeom { padding: [2, 2], ..Default::default() });
    conv_case("odd sizes", [3, 2, 5, 11], [1, 2, 2, 3], Conv2dGeom { padding: [1, 0], ..Default::default() });
}

#[test]
fn conv2d_stride_dilation_groups() {
    conv_case("stride 2", [2, 3, 9, 8], [5, 3, 3, 3], Conv2dGeom { stride: [2, 2], padding: [1, 1], ..Default::default() });
    conv_case("stride 3x1", [1, 2, 10, 7], [3, 2, 3, 2], Conv2dGeom { stride: [3, 1], ..Default::default() });
    conv_case("dilation 2", [1, 2, 9, 9], [3, 2, 3, 3], Conv2dGeom { dilation: [2, 2], padding: [2, 2], ..Default::default() });
    conv_case("groups 2", [2, 4, 6, 6], [6, 2, 3, 3], Conv2dGeom { groups: 2, padding: [1, 1], ..Default::default() });
    conv_case("depthwise", [1, 3, 5, 5], [3, 1, 3, 3], Conv2dGeom { groups: 3, ..Default::default() });
}

#[test]
fn conv2d_long_products_split_along_k() {
    // Products longer than one dispatch's k (1024 in the gathering kernel on lavapipe) resume mid-image: the
    // weight gradient sums 1600 output positions, the input gradient 120 channels x 9 taps.
    conv_case("k of the weight gradient 1600", [1, 1, 40, 40], [2, 1, 3, 3], Conv2dGeom { padding: [1, 1], ..Default::default() });
    conv_case("k of the input gradient 1080", [1, 2, 5, 6], [120, 2, 3, 3], Conv2dGeom { padding: [1, 1], ..Default::default() });
}

#[test]
fn conv2d_pointwise_takes_the_matmul_path() {
    conv_case("1x1", [2, 5, 3, 7], [4, 5, 1, 1], Conv2dGeom::default());
    conv_case("1x1 vec4", [3, 8, 4, 4], [12, 8, 1, 1], Conv2dGeom::default());
    // a strided 1x1 goes through the direct kernel
    conv_case("1x1 stride 2", [1, 4, 5, 5], [3, 4, 1, 1], Conv2dGeom { stride: [2, 2], ..Default::default() });
}

#[test]
fn conv2d_shape_errors_name_both_shapes() {
    require_gpu();
    let x = Tensor::zeros(&[1, 3, 8, 8]).unwrap();
    let e = x.conv2d(&Tensor::zeros(&[4, 2, 3, 3]).unwrap(), Conv2dGeom::default()).unwrap_err().to_string();
    assert!(e.contains("[1, 3, 8, 8]") && e.contains("[4, 2, 3, 3]"), "{e}");
    let e = x.conv2d(&Tensor::zeros(&[4, 3, 9, 9]).unwrap(), Conv2dGeom::default()).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
}

fn pool_case(name: &str, x: [usize; 4], geom: Pool2dGeom) {
    check_op(&format!("max_pool2d {name} {x:?}"), &[(&x, Domain::Any)], |t| Ok(t[0].max_pool2d(geom)?.0), |t| t[0].pool2d(&geom, true));
    check_op(&format!("avg_pool2d {name} {x:?}"), &[(&x, Domain::Any)], |t| t[0].avg_pool2d(geom), |t| t[0].pool2d(&geom, false));
}

#[test]
fn pooling_forward_and_backward() {
    pool_case("2x2", [2, 3, 8, 8], Pool2dGeom::square(2));
    pool_case("odd input", [1, 2, 7, 9], Pool2dGeom::square(2));
    pool_case("overlapping 3/2", [2, 2, 9, 9], Pool2dGeom { kernel: [3, 3], stride: [2, 2], padding: [0, 0], ceil_mode: false });
    pool_case("padded 3/2/1", [1, 3, 8, 7], Pool2dGeom { kernel: [3, 3], stride: [2, 2], padding: [1, 1], ceil_mode: false });
    pool_case("3x1", [1, 1, 9, 5], Pool2dGeom { kernel: [3, 1], stride: [1, 1], padding: [0, 0], ceil_mode: false });
    pool_case("ceil mode 3/2 on 8", [1, 2, 8, 8], Pool2dGeom { kernel: [3, 3], stride: [2, 2], padding: [0, 0], ceil_mode: true });
    pool_case("ceil mode 2/2 on 7", [2, 1, 7, 7], Pool2dGeom { kernel: [2, 2], stride: [2, 2], padding: [0, 0], ceil_mode: true });
}

#[test]
fn max_pool_switches_point_at_the_maxima() {
    require_gpu();
    let x = Tensor::from_slice(&[1.0, 5.0, 2.0, 0.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0, -1.0, 10.0, 0.5, 0.25, 11.0, -2.0], &[1, 1, 4, 4]).unwrap();
    let (y, s) = x.max_pool2d(Pool2dGeom::square(2)).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![5.0, 9.0, 7.0, 11.0]);
    assert_eq!(s.to_vec_u32().unwrap(), vec![1, 6, 8, 14]);
}

#[test]
fn global_average_pool() {
    check_op("global_avg_pool2d", &[(&[2, 3, 5, 7], Domain::Any)], |t| t[0].global_avg_pool2d(), |t| t[0].reduce(2, false, 1.0 / 5.0).reduce(3, false, 1.0 / 7.0).reshape(&[2, 3]));
}

#[test]
fn conv2d_weight_gradient_without_input_gradient() {
    // A first layer's input needs no gradient: the weight gradient must not depend on computing it.
    require_gpu();
    let mut rng = kiln_tests::test_rng("conv_weight_only");
    for geom in [Conv2dGeom::default(), Conv2dGeom { padding: [1, 1], stride: [2, 2], ..Default::default() }, Conv2dGeom { groups: 2, ..Default::default() }] {
        let xs: Vec<f32> = (0..2 * 4 * 6 * 6).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        let ws: Vec<f32> = (0..6 * 4 * 3 * 3).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        let wshape = [6, 4 / geom.groups, 3, 3];
        let ws = &ws[..wshape.iter().product::<usize>()];
        let x = Tensor::from_slice(&xs, &[2, 4, 6, 6]).unwrap();
        let w = Tensor::from_slice(ws, &wshape).unwrap().var();
        let only_w = x.conv2d(&w, geom).unwrap().sum_all().unwrap().backward().unwrap().get(&w).unwrap().to_vec().unwrap();
        let xv = x.var();
        let g = xv.conv2d(&w, geom).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(only_w, g.get(&w).unwrap().to_vec().unwrap(), "{geom:?}");
        assert!(g.get(&xv).is_some());
    }
}

#[test]
fn grouped_weight_gradient_on_a_map_past_the_loop_cap() {
    // The grouped (direct) weight-gradient kernel loops over the output map; a 260x260 map is past lavapipe's
    // 65535-iteration cap unless the rows are split. Each group's gradient must equal the one of the same
    // convolution run alone (groups = 1, the im2col path).
    require_gpu();
    let mut rng = test_rng("grouped weight gradient");
    let x = Tensor::randn(&[1, 2, 260, 260], 1.0, &mut rng).unwrap();
    let w = Tensor::randn(&[2, 1, 3, 3], 1.0, &mut rng).unwrap().var();
    let geom = Conv2dGeom { padding: [1, 1], groups: 2, ..Default::default() };
    let probe = Tensor::randn(&[1, 2, 260, 260], 1.0, &mut rng).unwrap();
    let grads = x.conv2d(&w, geom).unwrap().mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
    let got = grads.get(&w).unwrap().to_vec().unwrap();
    for c in 0..2 {
        let wc = w.slice(0, c, 1).unwrap().detach().var();
        let alone = Conv2dGeom { padding: [1, 1], ..Default::default() };
        let y = x.slice(1, c, 1).unwrap().conv2d(&wc, alone).unwrap();
        let g = y.mul(&probe.slice(1, c, 1).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let want = g.get(&wc).unwrap().to_vec().unwrap();
        // Each value sums 67,600 products in f32, in another order on each path: the rounding follows the size
        // of the sums, so a tap whose sum cancels to near zero is held to the group's largest, not its own.
        let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in got[9 * c..9 * c + 9].iter().zip(&want) {
            assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()) + 2e-5 * largest, "group {c}: {:?} vs {want:?}", &got[9 * c..9 * c + 9]);
        }
    }
}

#[test]
fn transposed_convolution_matches_torch_the_reference_and_finite_differences() {
    use kiln_graph::cpu::CpuTensor;
    require_gpu();
    // torch.nn.functional.conv_transpose2d (torch 2.15) of x = arange(48) / 10 - 1 as [2, 4, 3, 2] and
    // w = arange(72) / 20 - 0.8 as [4, 3, 3, 2], stride (2, 1), padding (1, 0), output_padding (1, 0),
    // groups 2, dilation (1, 2): [2, 6, 6, 4].
    let x: Vec<f32> = (0..48).map(|v| v as f32 / 10.0 - 1.0).collect();
    let w: Vec<f32> = (0..72).map(|v| v as f32 / 20.0 - 0.8).collect();
    let geom = Conv2dGeom { stride: [2, 1], padding: [1, 0], dilation: [1, 2], groups: 2 };
    let y = Tensor::from_slice(&x, &[2, 4, 3, 2]).unwrap().conv_transpose2d(&Tensor::from_slice(&w, &[4, 3, 3, 2]).unwrap(), geom, [1, 0]).unwrap();
    assert_eq!(y.shape(), &[2, 6, 6, 4]);
    #[rustfmt::skip]
    let want = [0.62, 0.57, 0.55, 0.51, 1.1, 1.0, 0.98, 0.9, 0.52, 0.47, 0.47, 0.43, 0.9, 0.8, 0.82, 0.74, 0.42, 0.37, 0.39, 0.35, 0.36, 0.33, 0.33, 0.31, 0.2, 0.21, 0.13, 0.15, 0.38, 0.4, 0.26, 0.3, 0.22, 0.23, 0.17, 0.19, 0.42, 0.44, 0.34, 0.38, 0.24, 0.25, 0.21, 0.23, 0.18, 0.21, 0.15, 0.19, -0.22, -0.15, -0.29, -0.21, -0.34, -0.2, -0.46, -0.3, -0.08, -0.01, -0.13, -0.05, -0.06, 0.08, -0.14, 0.02, 0.06, 0.13, 0.03, 0.11, 0.0, 0.09, -0.03, 0.07, 1.82, 2.13, 1.87, 2.19, 4.22, 4.84, 4.34, 4.98, 2.44, 2.75, 2.51, 2.83, 5.46, 6.08, 5.62, 6.26, 3.06, 3.37, 3.15, 3.47, 3.24, 3.57, 3.33, 3.67, 2.12, 2.49, 2.17, 2.55, 4.94, 5.68, 5.06, 5.82, 2.86, 3.23, 2.93, 3.31, 6.42, 7.16, 6.58, 7.34, 3.6, 3.97, 3.69, 4.07, 3.78, 4.17, 3.87, 4.27, 2.42, 2.85, 2.47, 2.91, 5.66, 6.52, 5.78, 6.66, 3.28, 3.71, 3.35, 3.79, 7.38, 8.24, 7.54, 8.42, 4.14, 4.57, 4.23, 4.67, 4.32, 4.77, 4.41, 4.87, -0.58, -0.63, -0.41, -0.45, -1.3, -1.4, -0.94, -1.02, -0.68, -0.73, -0.49, -0.53, -1.5, -1.6, -1.1, -1.18, -0.78, -0.83, -0.57, -0.61, -0.36, -0.39, -0.15, -0.17, 0.44, 0.45, 0.61, 0.63, 0.86, 0.88, 1.22, 1.26, 0.46, 0.47, 0.65, 0.67, 0.9, 0.92, 1.3, 1.34, 0.48, 0.49, 0.69, 0.71, 0.9, 0.93, 1.11, 1.15, 1.46, 1.53, 1.63, 1.71, 3.02, 3.16, 3.38, 3.54, 1.6, 1.67, 1.79, 1.87, 3.3, 3.44, 3.7, 3.86, 1.74, 1.81, 1.95, 2.03, 2.16, 2.25, 2.37, 2.47, 9.26, 9.57, 9.55, 9.87, 19.1, 19.72, 19.7, 20.34, 9.88, 10.19, 10.19, 10.51, 20.34, 20.96, 20.98, 21.62, 10.5, 10.81, 10.83, 11.15, 11.16, 11.49, 11.49, 11.83, 11.0, 11.37, 11.29, 11.67, 22.7, 23.44, 23.3, 24.06, 11.74, 12.11, 12.05, 12.43, 24.18, 24.92, 24.82, 25.58, 12.48, 12.85, 12.81, 13.19, 13.14, 13.53, 13.47, 13.87, 12.74, 13.17, 13.03, 13.47, 26.3, 27.16, 26.9, 27.78, 13.6, 14.03, 13.91, 14.35, 28.02, 28.88, 28.66, 29.54, 14.46, 14.89, 14.79, 15.23, 15.12, 15.57, 15.45, 15.91];
    kiln_tests::assert_close("conv_transpose2d against torch", &y.to_vec().unwrap(), &want, 1e-5);
    // Random sizes and geometries against the f64 reference, gradients for x and the weight by finite differences.
    type Case = ([usize; 4], [usize; 4], Conv2dGeom, [usize; 2]);
    let cases: [Case; 4] = [
        ([1, 3, 4, 5], [3, 2, 3, 3], Conv2dGeom { padding: [1, 1], ..Default::default() }, [0, 0]),
        ([2, 3, 5, 4], [3, 2, 3, 3], Conv2dGeom { stride: [2, 2], padding: [1, 1], ..Default::default() }, [1, 1]),
        ([1, 4, 4, 5], [4, 3, 2, 3], Conv2dGeom { dilation: [2, 1], groups: 2, ..Default::default() }, [0, 0]),
        ([2, 2, 3, 3], [2, 3, 4, 3], Conv2dGeom { stride: [3, 2], padding: [2, 1], ..Default::default() }, [2, 1]),
    ];
    for (xs, ws, geom, op) in cases {
        check_op(
            &format!("conv_transpose2d x {xs:?} w {ws:?} {geom:?} output_padding {op:?}"),
            &[(&xs, Domain::Any), (&ws, Domain::Any)],
            |t| t[0].conv_transpose2d(&t[1], geom, op),
            |t| t[0].conv_transpose2d(&t[1], &geom, op),
        );
    }
    // The adjoint test: <conv2d(a, w), b> = <a, conv_transpose2d(b, w)> for the same weight and geometry.
    let mut rng = test_rng("conv_transpose_adjoint");
    let geom = Conv2dGeom { stride: [2, 2], padding: [1, 1], dilation: [1, 1], groups: 1 };
    let rand = |shape: &[usize], rng: &mut kiln_graph::Rng| CpuTensor::new(kiln_tests::random_values(shape.iter().product(), Domain::Any, rng), shape);
    let (a, w, b) = (rand(&[2, 3, 7, 8], &mut rng), rand(&[5, 3, 3, 3], &mut rng), rand(&[2, 5, 4, 4], &mut rng));
    let gpu = |t: &CpuTensor| kiln_tests::to_gpu(t);
    let conv = gpu(&a).conv2d(&gpu(&w), geom).unwrap().to_vec().unwrap();
    // 7 x 8 inputs give 4 x 4 outputs at stride 2; back to 7 x 8 needs output_padding (0, 1).
    let back = gpu(&b).conv_transpose2d(&gpu(&w), geom, [0, 1]).unwrap();
    assert_eq!(back.shape(), &[2, 3, 7, 8]);
    let lhs: f64 = conv.iter().zip(&b.data).map(|(u, v)| *u as f64 * v).sum();
    let rhs: f64 = back.to_vec().unwrap().iter().zip(&a.data).map(|(u, v)| *u as f64 * v).sum();
    assert!((lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()), "<conv(a), b> {lhs} against <a, conv_transpose(b)> {rhs}");
    // Bad input: a weight whose first axis is not c_in, output_padding not under the stride.
    let xt = gpu(&a);
    let e = xt.conv_transpose2d(&gpu(&w), geom, [0, 0]).unwrap_err().to_string();
    assert!(e.contains("[2, 3, 7, 8]") && e.contains("[5, 3, 3, 3]"), "{e}");
    let e = gpu(&b).conv_transpose2d(&gpu(&w), geom, [2, 0]).unwrap_err().to_string();
    assert!(e.contains("output_padding"), "{e}");
}

#[test]
fn conv_transpose_layer_has_pytorchs_names_shapes_and_init() {
    use kiln_nn::{ConvTranspose2d, Layer, Module, VarStore};
    require_gpu();
    let mut vs = VarStore::new(3);
    // nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2): weight [4, 3, 3, 3], bias [6].
    let layer = ConvTranspose2d::new(&mut vs, "up", 4, 6, 3, 2, 1, 1, 2, true).unwrap();
    vs.finish().unwrap();
    let names: Vec<(String, Vec<usize>)> = layer.own_params().iter().map(|p| (p.name().to_string(), p.shape().to_vec())).collect();
    assert_eq!(names, vec![("up.weight".to_string(), vec![4, 3, 3, 3]), ("up.bias".to_string(), vec![6])]);
    let bound = 1.0 / (3.0f32 * 9.0).sqrt();
    let w = layer.weight.tensor().unwrap().to_vec().unwrap();
    assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > 0.5 * bound), "U(-{bound}, {bound})");
    let x = Tensor::from_slice(&[0.5; 2 * 4 * 5 * 3], &[2, 4, 5, 3]).unwrap();
    let y = layer.forward(&x).unwrap();
    assert_eq!(y.shape(), &[2, 6, 10, 6], "(5 - 1) 2 - 2 + 3 + 1 = 10, (3 - 1) 2 - 2 + 3 + 1 = 6");
    assert_eq!(layer.output_shape(&[2, 4, 5, 3]).unwrap(), vec![2, 6, 10, 6]);
    assert!(ConvTranspose2d::new(&mut VarStore::new(1), "bad", 4, 6, 3, 2, 1, 2, 1, true).is_err(), "output_padding 2 at stride 2");
}
