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
        for (a, b) in got[9 * c..9 * c + 9].iter().zip(&want) {
            assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "group {c}: {:?} vs {want:?}", &got[9 * c..9 * c + 9]);
        }
    }
}
