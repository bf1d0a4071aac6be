//! Detection ops against torchvision and the f64 reference: RoI-Align forward and backward (aligned or not,
//! adaptive or fixed sampling, boxes partly outside the image, of negative size, of another batch image), the
//! backward split over several dispatches, and bad arguments as clear errors.

use kiln_graph::cpu::{self, CpuTensor};
use kiln_graph::vision::RoiAlignGeom;
use kiln_graph::{Pool2dGeom, Tensor};
use kiln_tests::{assert_close, check_op, check_op_with, require_gpu, test_rng, Domain};

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Random boxes over an image of `w` x `h` input pixels: some inside, some hanging over an edge, one of
/// negative size, one of a batch index past the end; (batch index, x1, y1, x2, y2) rows.
fn random_rois(k: usize, n: usize, w: f64, h: f64, rng: &mut kiln_graph::Rng) -> Vec<f32> {
    let mut rois = Vec::with_capacity(5 * k);
    for i in 0..k {
        let b = if i == k - 1 { n as f64 } else { rng.below(n) as f64 };
        let (x1, y1) = (rng.range(-0.2 * w, 0.9 * w), rng.range(-0.2 * h, 0.9 * h));
        let (mut x2, y2) = (x1 + rng.range(0.3, 0.8 * w), y1 + rng.range(0.3, 0.8 * h));
        if i == 1 {
            x2 = x1 - 1.5;
        }
        rois.extend([b, x1, y1, x2, y2].map(|v| v as f32));
    }
    rois
}

/// The GPU places RoI-Align's samples in f32: at coordinates up to 12 a position is off by up to 1e-6 px,
/// which moves an average of samples by a few 1e-6, about 1e-4 of the smallest outputs the check weighs (a CI
/// run of the 150-box case measured 1.01e-4). The forward gets 5e-4; the gradients keep the default.
fn roi_align_tolerance() -> kiln_graph::gradcheck::Tolerance {
    kiln_graph::gradcheck::Tolerance { forward: 5e-4, ..Default::default() }
}

#[test]
fn roi_align_matches_the_reference_and_finite_differences() {
    let mut rng = test_rng("roi_align_boxes");
    // Channel counts around the backward's blocks of kernels::ROI_CB (8): one short block, several, a last
    // one partly full.
    for (aligned, sampling, out, c) in [(false, 0, [3, 2], 3), (true, 0, [2, 3], 11), (false, 2, [1, 1], 17), (true, 3, [3, 3], 8)] {
        // Features at half the image's resolution (spatial_scale 0.5), odd sizes.
        let rois = random_rois(6, 2, 22.0, 18.0, &mut rng);
        let geom = RoiAlignGeom::new(out, 0.5, sampling, aligned);
        let rois_gpu = Tensor::from_slice(&rois, &[6, 5]).unwrap();
        let rois_cpu = f64s(&rois);
        check_op_with(
            &format!("roi_align aligned={aligned} sampling_ratio={sampling} output {out:?}"),
            &[(&[2, c, 9, 11], Domain::Any)],
            roi_align_tolerance(),
            |x| x[0].roi_align(&rois_gpu, geom),
            |x| cpu::roi_align(&x[0], &rois_cpu, &geom),
        );
    }
}

#[test]
fn roi_align_equals_torchvision() {
    require_gpu();
    // torchvision 0.29.2: x = torch.arange(40.).reshape(2, 1, 4, 5), these boxes, output (2, 3), scale 1.
    let x: Vec<f32> = (0..40).map(|v| v as f32).collect();
    let rois = [0.0, 0.3, 0.7, 3.6, 2.9, 1.0, -1.5, -0.5, 2.2, 5.0, 0.0, 2.0, 1.0, 1.5, 3.0];
    let xt = Tensor::from_slice(&x, &[2, 1, 4, 5]).unwrap().var();
    let rt = Tensor::from_slice(&rois, &[3, 5]).unwrap();
    #[rustfmt::skip]
    let cases: [(bool, i32, [f64; 18]); 4] = [
        (false, 0, [7.1, 8.2, 9.3, 12.6, 13.7, 14.8, 12.222222222222223, 24.794444444444448, 26.027777777777775, 11.423611111111112, 23.080555555555552, 23.902777777777782, 9.666666666666666, 10.0, 10.333333333333332, 14.666666666666666, 15.0, 15.333333333333332]),
        (false, 2, [7.1, 8.2, 9.3, 12.6, 13.7, 14.8, 12.1875, 24.725, 25.958333333333332, 8.671875, 17.51875, 18.135416666666664, 9.666666666666668, 10.0, 10.333333333333332, 14.666666666666666, 15.0, 15.333333333333334]),
        (true, 0, [4.1, 5.2, 6.3, 9.6, 10.7, 11.8, 0.0, 22.85694444444444, 23.86111111111111, 0.0, 22.066666666666666, 22.736111111111114, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
        (true, 2, [4.1, 5.2, 6.3, 9.6, 10.7, 11.8, 0.0, 22.735416666666666, 23.739583333333332, 0.0, 33.672916666666666, 34.67708333333333, 6.416666666666667, 6.25, 6.083333333333334, 11.416666666666666, 11.25, 11.083333333333332]),
    ];
    for (aligned, sampling, want) in cases {
        let y = xt.roi_align(&rt, RoiAlignGeom::new([2, 3], 1.0, sampling, aligned)).unwrap();
        assert_close(&format!("torchvision roi_align aligned={aligned} sampling_ratio={sampling}"), &y.to_vec().unwrap(), &want, 1e-5);
        let reference = cpu::roi_align(&CpuTensor::new(f64s(&x), &[2, 1, 4, 5]), &f64s(&rois), &RoiAlignGeom::new([2, 3], 1.0, sampling, aligned));
        assert_close("the f64 reference against torchvision", &reference.data.iter().map(|&v| v as f32).collect::<Vec<_>>(), &want, 1e-6);
    }
    // The gradient of sum(y * (arange(18) / 10 - 0.5)) with aligned=True, sampling_ratio=2 (the third box has
    // negative width and still samples, as in torchvision).
    let weights: Vec<f32> = (0..18).map(|v| v as f32 / 10.0 - 0.5).collect();
    let y = xt.roi_align(&rt, RoiAlignGeom::new([2, 3], 1.0, 2, true)).unwrap();
    let grads = y.mul(&Tensor::from_slice(&weights, &[3, 1, 2, 3]).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    #[rustfmt::skip]
    let want = [-0.0853125, 0.125479166667, -0.011854166667, -0.0433125, 0.0, -0.26325, 1.375604166667, 0.286020833333, -0.119625, 0.0, -0.0983125, 2.014854166667, 0.628020833333, -0.0020625, 0.0, -0.008125, 0.305729166667, 0.096145833333, 0.0, 0.0, 0.108958333333, 0.111666666667, 0.029375, 0.0, 0.0, 0.1021484375, 0.1046875, 0.0275390625, 0.0, 0.0, 0.155286458333, 0.134830729167, 0.0348828125, 0.0, 0.0, 0.379440104167, 0.326731770833, 0.084453125, 0.0, 0.0];
    assert_close("torchvision roi_align gradient", &grads.get(&xt).unwrap().to_vec().unwrap(), &want, 1e-5);
}

#[test]
fn roi_align_backward_over_many_boxes_is_split_and_still_exact() {
    // 150 boxes with 7 x 7 bins of 4 x 4 samples: on a CPU adapter the backward runs in several dispatches
    // (lavapipe stops an invocation's loops after 65,535 iterations).
    let mut rng = test_rng("roi_align_many");
    let rois = random_rois(150, 1, 24.0, 20.0, &mut rng);
    let geom = RoiAlignGeom::new([7, 7], 0.5, 4, false);
    let rois_gpu = Tensor::from_slice(&rois, &[150, 5]).unwrap();
    let rois_cpu = f64s(&rois);
    check_op_with("roi_align, 150 boxes", &[(&[1, 2, 10, 12], Domain::Any)], roi_align_tolerance(), |x| x[0].roi_align(&rois_gpu, geom), |x| cpu::roi_align(&x[0], &rois_cpu, &geom));
}

/// Bins of more than 65,535 samples inside the map (a 1 x 1 output over 256 x 250, adaptive sampling: 256 x
/// 250 samples), which CPU adapters scan in bands of sample rows, and a box hanging over the edges, against the
/// f64 reference; fixed sampling too.
#[test]
fn roi_align_over_bins_larger_than_the_loop_cap_is_exact() {
    require_gpu();
    let mut rng = test_rng("roi_align_huge_bin");
    let (h, w) = (256, 250);
    // Values about 2 (a mean of 64,000 values near 0 would be all rounding), with a ramp so bands differ.
    let x: Vec<f32> = kiln_tests::random_values(2 * h * w, Domain::Any, &mut rng).iter().enumerate().map(|(i, &v)| (2.0 + v + (i / w % h) as f64 / 64.0) as f32).collect();
    let rois = [0.0, 0.0, 0.0, 249.0, 255.0, 0.0, -50.0, 100.0, 400.0, 300.0, 0.0, 3.5, 7.25, 240.0, 250.0];
    let xt = Tensor::from_slice(&x, &[1, 2, h, w]).unwrap();
    let rt = Tensor::from_slice(&rois, &[3, 5]).unwrap();
    for (out, sampling, aligned) in [([1, 1], 0, false), ([2, 1], 0, true), ([1, 1], 300, false)] {
        let geom = RoiAlignGeom::new(out, 1.0, sampling, aligned);
        let got = xt.roi_align(&rt, geom).unwrap().to_vec().unwrap();
        let want = cpu::roi_align(&CpuTensor::new(f64s(&x), &[1, 2, h, w]), &f64s(&rois), &geom);
        assert_close(&format!("roi_align {out:?}, sampling {sampling}, aligned {aligned}"), &got, &want.data, 1e-4);
    }
}

#[test]
fn roi_align_second_derivative_is_roi_align_again() {
    // RoI-Align is linear: the gradient of <grad_x, v> with respect to the upstream gradient is roi_align(v).
    require_gpu();
    let mut rng = test_rng("roi_align_adjoint");
    let rois = random_rois(4, 2, 14.0, 12.0, &mut rng);
    let geom = RoiAlignGeom::new([2, 2], 1.0, 0, true);
    let rt = Tensor::from_slice(&rois, &[4, 5]).unwrap();
    let random = |shape: &[usize], rng: &mut kiln_graph::Rng| {
        Tensor::from_slice(&kiln_tests::random_values(shape.iter().product(), Domain::Any, rng).iter().map(|&v| v as f32).collect::<Vec<_>>(), shape).unwrap()
    };
    let (x, v, gy) = (random(&[2, 3, 12, 14], &mut rng), random(&[2, 3, 12, 14], &mut rng), random(&[4, 3, 2, 2], &mut rng).var());
    let gx = kiln_graph::vision::roi_align_grad(&gy, &rt, &geom, x.shape()).unwrap();
    let second = gx.mul(&v).unwrap().sum_all().unwrap().backward().unwrap();
    let want = v.roi_align(&rt, geom).unwrap().to_vec().unwrap();
    assert_close("d<grad_x, v>/d grad_y", &second.get(&gy).unwrap().to_vec().unwrap(), &f64s(&want), 1e-5);
    // And the adjoint identity <roi_align(x), gy> = <x, grad_x(gy)>.
    let lhs: f64 = x.roi_align(&rt, geom).unwrap().to_vec().unwrap().iter().zip(gy.to_vec().unwrap()).map(|(a, b)| (*a as f64) * b as f64).sum();
    let rhs: f64 = x.to_vec().unwrap().iter().zip(gx.to_vec().unwrap()).map(|(a, b)| (*a as f64) * b as f64).sum();
    assert!((lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()), "adjoint: {lhs} against {rhs}");
}

#[test]
fn roi_align_rejects_bad_arguments_with_clear_errors() {
    require_gpu();
    let x = Tensor::from_slice(&[0.0; 2 * 3 * 4 * 4], &[2, 3, 4, 4]).unwrap();
    let four = Tensor::from_slice(&[0.0, 0.0, 2.0, 2.0], &[1, 4]).unwrap();
    let e = x.roi_align(&four, RoiAlignGeom::new([2, 2], 1.0, 0, false)).unwrap_err().to_string();
    assert!(e.contains("[k, 5]") && e.contains("[1, 4]"), "{e}");
    let rois = Tensor::from_slice(&[0.0, 0.0, 0.0, 2.0, 2.0], &[1, 5]).unwrap();
    let e = x.reshape(&[6, 4, 4]).unwrap().roi_align(&rois, RoiAlignGeom::new([2, 2], 1.0, 0, false)).unwrap_err().to_string();
    assert!(e.contains("[n, c, h, w]"), "{e}");
    let e = x.roi_align(&rois, RoiAlignGeom::new([0, 2], 1.0, 0, false)).unwrap_err().to_string();
    assert!(e.contains("output_size"), "{e}");
    // A diverged proposal: infinite corners give zeros; a box of a million pixels finishes (only the samples
    // inside the image are read) with finite values.
    let wild = Tensor::from_slice(&[0.0, f32::NEG_INFINITY, 0.0, 2.0, f32::INFINITY, 1.0, -1e6, -1e6, 1e6, 1e6], &[2, 5]).unwrap();
    let y = x.add_scalar(1.0).unwrap().roi_align(&wild, RoiAlignGeom::new([2, 2], 1.0, 0, false)).unwrap().to_vec().unwrap();
    assert!(y[..12].iter().all(|&v| v == 0.0) && y[12..].iter().all(|v| v.is_finite()), "{y:?}");
    // No boxes: an empty result, and a zero gradient.
    let none = Tensor::from_slice(&[] as &[f32], &[0, 5]).unwrap();
    assert_eq!(x.roi_align(&none, RoiAlignGeom::new([2, 2], 1.0, 0, false)).unwrap().shape(), &[0, 3, 2, 2]);
}

fn boxes(rows: &[[f32; 4]]) -> Tensor {
    Tensor::from_slice(&rows.concat(), &[rows.len(), 4]).unwrap()
}

#[test]
fn box_operations_equal_torchvision() {
    use kiln_graph::vision::{box_iou, clip_boxes_to_image, generalized_box_iou, resize_boxes, BoxCoder};
    require_gpu();
    // Values from torchvision 0.29.2 (box_iou, generalized_box_iou, BoxCoder((10, 10, 5, 5)),
    // clip_boxes_to_image) on the same boxes, in f64.
    let a = boxes(&[[0., 0., 10., 10.], [5., 5., 15., 12.], [2., 3., 4., 9.]]);
    let b = boxes(&[[0., 0., 10., 10.], [20., 20., 25., 30.], [3., 1., 8., 7.5], [9., 9., 9., 9.]]);
    let iou = [1.0, 0.0, 0.325, 0.0, 0.1724137931034483, 0.0, 0.07894736842105263, 0.0, 0.12, 0.0, 0.1125, 0.0];
    assert_close("box_iou", &box_iou(&a, &b).unwrap().to_vec().unwrap(), &iou, 1e-6);
    let b3 = b.slice(0, 0, 3).unwrap();
    let giou = [1.0, -0.8, 0.325, -0.02203065134099616, -0.76, -0.20135566188197765, 0.12, -0.9001610305958132, -0.054166666666666655];
    assert_close("generalized_box_iou", &generalized_box_iou(&a, &b3).unwrap().to_vec().unwrap(), &giou, 1e-6);
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    let enc = [0.0, 0.0, 0.0, 0.0, 12.5, 23.571428571428573, -3.4657359027997265, 1.783374719693662, 12.5, -2.9166666666666665, 4.5814536593707755, 0.4002135383676818];
    assert_close("BoxCoder.encode_single", &coder.encode(&b3, &a).unwrap().to_vec().unwrap(), &enc, 1e-5);
    let deltas = boxes(&[[0.5, -0.2, 0.3, -0.1], [0., 0., 5., 5.], [-1., 2., -0.5, 0.2]]);
    #[rustfmt::skip]
    let dec = [0.1908172672732018, -0.10099336653377655, 10.809182732726798, 9.700993366533776, -3.591409142295225, -1.013986399606658, 23.591409142295227, 18.013986399606658, 1.8951625819640403, 4.077567677422835, 3.704837418035959, 10.322432322577164];
    assert_close("BoxCoder.decode_single (dw, dh clamped)", &coder.decode(&deltas, &a).unwrap().to_vec().unwrap(), &dec, 1e-5);
    let clipped = clip_boxes_to_image(&boxes(&[[-3., 2., 50., 70.], [10., -1., 20., 30.]]), [60, 40]).unwrap().to_vec().unwrap();
    assert_eq!(clipped, vec![0., 2., 40., 60., 10., 0., 20., 30.]);
    // The seed's example: a box on a 416 x 416 input, on the 1000 x 667 (width x height) original. The seed
    // writes (279, 212, 579, 544); the exact y2 is 340 * 667 / 416 = 545.14, so it rounds to 545.
    let r = resize_boxes(&boxes(&[[116., 132., 241., 340.]]), [416, 416], [667, 1000]).unwrap().to_vec().unwrap();
    assert_eq!(r.iter().map(|v| v.round()).collect::<Vec<_>>(), vec![279., 212., 579., 545.], "{r:?}");
    let e = box_iou(&a, &Tensor::from_slice(&[0.0; 6], &[2, 3]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[n, 4]") && e.contains("[2, 3]"), "{e}");
}

#[test]
fn iou_giou_and_box_coding_match_the_reference_and_finite_differences() {
    use kiln_graph::vision::{box_iou, generalized_box_iou, BoxCoder};
    let mut rng = test_rng("boxes_iou");
    // Boxes from raw values r: (x1, y1) = 4 r0, 4 r1 and the sizes exp(r2), exp(r3): always proper boxes,
    // and the map is smooth, so finite differences see the IoUs' own gradients.
    let to_boxes = |r: &Tensor| -> kiln_graph::Result<Tensor> {
        let xy = r.slice(1, 0, 2)?.scale(4.0)?;
        Tensor::concat(&[&xy, &xy.add(&r.slice(1, 2, 2)?.exp()?)?], 1)
    };
    let cpu_boxes = |r: &CpuTensor| -> Vec<[f64; 4]> { r.data.chunks(4).map(|c| [4.0 * c[0], 4.0 * c[1], 4.0 * c[0] + c[2].exp(), 4.0 * c[1] + c[3].exp()]).collect() };
    for giou in [false, true] {
        check_op(
            if giou { "generalized_box_iou" } else { "box_iou" },
            &[(&[5, 4], Domain::Any), (&[7, 4], Domain::Any)],
            |x| {
                let (a, b) = (to_boxes(&x[0])?, to_boxes(&x[1])?);
                if giou {
                    generalized_box_iou(&a, &b)
                } else {
                    box_iou(&a, &b)
                }
            },
            |x| {
                let (iou, g) = cpu::box_iou_giou(&cpu_boxes(&x[0]), &cpu_boxes(&x[1]));
                CpuTensor::new(if giou { g } else { iou }, &[5, 7])
            },
        );
    }
    let weights = [10.0, 10.0, 5.0, 5.0];
    let coder = BoxCoder::new(weights.map(|w| w as f32));
    check_op(
        "BoxCoder encode",
        &[(&[6, 4], Domain::Any), (&[6, 4], Domain::Any)],
        |x| coder.encode(&to_boxes(&x[0])?, &to_boxes(&x[1])?),
        |x| {
            let (g, p) = (cpu_boxes(&x[0]), cpu_boxes(&x[1]));
            CpuTensor::new(g.iter().zip(&p).flat_map(|(g, p)| cpu::box_encode(g, p, weights)).collect(), &[6, 4])
        },
    );
    check_op(
        "BoxCoder decode",
        &[(&[6, 4], Domain::Any), (&[6, 4], Domain::Any)],
        |x| coder.decode(&x[0], &to_boxes(&x[1])?),
        |x| {
            let b = cpu_boxes(&x[1]);
            CpuTensor::new(x[0].data.chunks(4).zip(&b).flat_map(|(d, b)| cpu::box_decode(&[d[0], d[1], d[2], d[3]], b, weights, (1000.0f64 / 16.0).ln())).collect(), &[6, 4])
        },
    );
    // Decoding what encoding made gives the boxes back.
    let mut rng2 = test_rng("boxes_roundtrip");
    let raw = |rng: &mut kiln_graph::Rng| Tensor::from_slice(&kiln_tests::random_values(24, Domain::Any, rng).iter().map(|&v| v as f32).collect::<Vec<_>>(), &[6, 4]).unwrap();
    let (gt, anchors) = (to_boxes(&raw(&mut rng2)).unwrap(), to_boxes(&raw(&mut rng)).unwrap());
    let back = coder.decode(&coder.encode(&gt, &anchors).unwrap(), &anchors).unwrap().to_vec().unwrap();
    assert_close("decode(encode(boxes))", &back, &f64s(&gt.to_vec().unwrap()), 1e-4);
}

#[test]
fn nms_equals_torchvision_and_the_course_defaults() {
    use kiln_graph::vision::{batched_nms, nms, nms_fixed, nms_with, NmsOptions};
    require_gpu();
    let b = boxes(&[[0., 0., 10., 10.], [1., 1., 11., 11.], [0., 0., 3., 1.], [1., 0., 4., 1.], [20., 20., 30., 30.], [21., 19., 29., 31.], [50., 50., 60., 60.], [0., 0., 10., 10.]]);
    let s = Tensor::from_slice(&[0.9, 0.8, 0.7, 0.7, 0.95, 0.6, 0.3, 0.9], &[8]).unwrap();
    let c = Tensor::from_u32(&[0, 0, 1, 1, 2, 2, 0, 1], &[8]).unwrap();
    // torchvision 0.29.2 on the same boxes: boxes 2 and 3 overlap at IoU exactly 0.5 (kept: only above the
    // threshold suppresses), box 7 repeats box 0 at its score (the stable order keeps 0).
    assert_eq!(nms(&b, &s, 0.5).unwrap(), vec![4, 0, 2, 3, 6]);
    assert_eq!(nms(&b, &s, 0.7).unwrap(), vec![4, 0, 1, 2, 3, 5, 6]);
    assert_eq!(batched_nms(&b, &s, &c, 0.5).unwrap(), vec![4, 0, 7, 2, 3, 6]);
    // The course's defaults: scores of 0.6 and below dropped, IoU of 0.5 and above suppressed.
    assert_eq!(nms_with(&b, &s, None, NmsOptions::default()).unwrap(), vec![4, 0, 2]);
    assert_eq!(nms_with(&b, &s, None, NmsOptions { max_keep: Some(2), ..NmsOptions::torchvision(0.5) }).unwrap(), vec![4, 0]);
    // Fixed-size outputs: the kept indices, then n; the count.
    let (keep, count) = nms_fixed(&b, &s, None, NmsOptions::torchvision(0.5)).unwrap();
    assert_eq!((keep.to_vec_u32().unwrap(), count.to_vec_u32().unwrap()), (vec![4, 0, 2, 3, 6, 8, 8, 8], vec![5]));
    // No boxes; a NaN score; mismatched shapes.
    let none = Tensor::from_slice(&[] as &[f32], &[0, 4]).unwrap();
    assert_eq!(nms(&none, &Tensor::from_slice(&[] as &[f32], &[0]).unwrap(), 0.5).unwrap(), Vec::<u32>::new());
    let nan = Tensor::from_slice(&[0.9, f32::NAN, 0.7, 0.7, 0.95, 0.6, 0.3, 0.9], &[8]).unwrap();
    assert_eq!(nms(&b, &nan, 0.5).unwrap(), vec![4, 0, 2, 3, 6], "a NaN score is never kept");
    let minus_inf = Tensor::from_slice(&[0.9, 0.8, 0.7, 0.7, 0.95, 0.6, f32::NEG_INFINITY, 0.9], &[8]).unwrap();
    assert_eq!(nms(&b, &minus_inf, 0.5).unwrap(), vec![4, 0, 2, 3, 6], "a score of -inf is a candidate, as in torchvision");
    let e = nms(&b, &Tensor::from_slice(&[0.5; 7], &[7]).unwrap(), 0.5).unwrap_err().to_string();
    assert!(e.contains("[8, 4]") && e.contains("[7]"), "{e}");
}

/// Random boxes on a 100 x 100 canvas (many overlaps), scores in steps of 0.05 (many ties), 4 classes. The
/// corners are whole pixels, so every IoU is a fraction of small integers that f32 and f64 both place on the
/// same side of a threshold (an IoU near it but not on it differs from it by far more than f32's rounding).
fn random_detections(n: usize, rng: &mut kiln_graph::Rng) -> (Vec<[f32; 4]>, Vec<f32>, Vec<u32>) {
    let b = (0..n)
        .map(|_| {
            let (x, y) = (rng.below(90) as f32, rng.below(90) as f32);
            [x, y, x + 3.0 + rng.below(28) as f32, y + 3.0 + rng.below(28) as f32]
        })
        .collect();
    let s = (0..n).map(|_| (rng.below(20) as f32) * 0.05).collect();
    let c = (0..n).map(|_| rng.below(4) as u32).collect();
    (b, s, c)
}

#[test]
fn nms_matches_the_reference_on_random_boxes_with_ties() {
    use kiln_graph::vision::{nms_with, NmsOptions};
    require_gpu();
    let mut rng = test_rng("nms_random");
    // Sizes on both sides of powers of two (the ranking is a bitonic sort over n rounded up to one).
    for (n, signed) in [(1, false), (2, true), (37, false), (64, true), (300, false), (1000, false), (1024, true), (1025, true)] {
        let (b, mut s, c) = random_detections(n, &mut rng);
        if signed {
            // Negative scores, both zeros (equal: a tie broken by index), infinities and NaN (never kept).
            let special = [-0.0, 0.0, f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -1e-30, 1e-30];
            for (i, v) in s.iter_mut().enumerate() {
                *v = if rng.below(4) == 0 { special[i % special.len()] } else { *v - 0.5 };
            }
        }
        let (bt, st, ct) = (boxes(&b), Tensor::from_slice(&s, &[n]).unwrap(), Tensor::from_u32(&c, &[n]).unwrap());
        let b64: Vec<[f64; 4]> = b.iter().map(|r| r.map(|v| v as f64)).collect();
        let s64 = f64s(&s);
        for (opts, per_class) in
            [(NmsOptions::torchvision(0.5), false), (NmsOptions::torchvision(0.3), true), (NmsOptions::default(), false), (NmsOptions { max_keep: Some(10), ..NmsOptions::default() }, true)]
        {
            let got = nms_with(&bt, &st, per_class.then_some(&ct), opts).unwrap();
            let want = cpu::nms(
                &b64,
                &s64,
                per_class.then_some(&c[..]),
                opts.iou_threshold as f64,
                opts.score_threshold.map(|v| v as f64).unwrap_or(f64::NEG_INFINITY),
                opts.max_keep.unwrap_or(n),
                opts.suppress_equal,
            );
            assert_eq!(got, want, "n {n}, {opts:?}, per class {per_class}");
        }
    }
}

#[test]
fn nms_split_into_many_dispatches_gives_the_same_boxes() {
    // A loop cap of 500 iterations splits the scan into blocks of a few rows.
    use kiln_graph::vision::{nms_fixed_capped, NmsOptions};
    require_gpu();
    let mut rng = test_rng("nms_split");
    let n = 700;
    let (b, s, _) = random_detections(n, &mut rng);
    let (bt, st) = (boxes(&b), Tensor::from_slice(&s, &[n]).unwrap());
    let opts = NmsOptions { iou_threshold: 0.4, score_threshold: Some(0.2), max_keep: None, suppress_equal: false };
    let read = |cap: Option<usize>| -> Vec<u32> {
        let (keep, count) = nms_fixed_capped(&bt, &st, None, opts, cap).unwrap();
        let mut keep = keep.to_vec_u32().unwrap();
        keep.truncate(count.to_vec_u32().unwrap()[0] as usize);
        keep
    };
    let b64: Vec<[f64; 4]> = b.iter().map(|r| r.map(|v| v as f64)).collect();
    // The thresholds as the GPU sees them (f32; a score of 4 x 0.05 equals 0.2f32 and is not above it).
    let want = cpu::nms(&b64, &f64s(&s), None, 0.4f32 as f64, 0.2f32 as f64, n, false);
    assert_eq!(read(Some(500)), want);
    assert_eq!(read(None), want);
}

#[test]
fn upsampling_and_unpooling_equal_torch() {
    require_gpu();
    // torch.nn.functional.interpolate (torch 2.15) of x = arange(24) ** 1.5 / 10 as [1, 2, 3, 4], to 5 x 7
    // (nearest; bilinear with align_corners False and True) and to 2 x 3 (bilinear, False).
    #[rustfmt::skip]
    let nearest: [f64; 70] = [0.0, 0.0, 0.1, 0.1, 0.2828427125, 0.2828427125, 0.5196152423, 0.0, 0.0, 0.1, 0.1, 0.2828427125, 0.2828427125, 0.5196152423, 0.8, 0.8, 1.1180339887, 1.1180339887, 1.4696938457, 1.4696938457, 1.8520259177, 0.8, 0.8, 1.1180339887, 1.1180339887, 1.4696938457, 1.4696938457, 1.8520259177, 2.2627416998, 2.2627416998, 2.7, 2.7, 3.1622776602, 3.1622776602, 3.6482872694, 4.1569219382, 4.1569219382, 4.6872166581, 4.6872166581, 5.2383203415, 5.2383203415, 5.8094750193, 4.1569219382, 4.1569219382, 4.6872166581, 4.6872166581, 5.2383203415, 5.2383203415, 5.8094750193, 6.4, 6.4, 7.0092795636, 7.0092795636, 7.6367532368, 7.6367532368, 8.2819079927, 6.4, 6.4, 7.0092795636, 7.0092795636, 7.6367532368, 7.6367532368, 8.2819079927, 8.94427191, 8.94427191, 9.6234089594, 9.6234089594, 10.3189146716, 10.3189146716, 11.0304125036];
    #[rustfmt::skip]
    let bilinear: [f64; 70] = [0.0, 0.0357142857, 0.0928571429, 0.1914213562, 0.299755036, 0.4350536245, 0.5196152423, 0.32, 0.3868619984, 0.4938411958, 0.6323983806, 0.7786543334, 0.9472236744, 1.0525795125, 0.8, 0.9135835674, 1.0953172753, 1.2938639172, 1.4970032794, 1.7154787491, 1.8520259177, 1.6776450199, 1.816776654, 2.0393872687, 2.2762288649, 2.5169968911, 2.771018945, 2.9297827287, 2.2627416998, 2.4189053784, 2.6687672643, 2.9311388301, 3.1969926323, 3.474712409, 3.6482872694, 4.1569219382, 4.3463129096, 4.6493384638, 4.9627684998, 5.2791171042, 5.6054912058, 5.8094750193, 5.0541531629, 5.2548276834, 5.5759069162, 5.9068676599, 6.2406045503, 6.5838929554, 6.7984482087, 6.4, 6.6175998441, 6.9657595947, 7.3230164002, 7.6828357194, 8.0514955799, 8.2819079927, 7.926563146, 8.1591324514, 8.53124334, 8.9119036494, 9.2949758549, 9.686381913, 9.9310106993, 8.94427191, 9.1868208562, 9.5748991702, 9.9711618155, 10.3697359453, 10.776306135, 11.0304125036];
    #[rustfmt::skip]
    let corners: [f64; 70] = [0.0, 0.05, 0.1, 0.1914213562, 0.2828427125, 0.4012289774, 0.5196152423, 0.4, 0.5045084972, 0.6090169944, 0.7426426367, 0.8762682791, 1.0310444295, 1.18582058, 0.8, 0.9590169944, 1.1180339887, 1.2938639172, 1.4696938457, 1.6608598817, 1.8520259177, 1.5313708499, 1.7201939221, 1.9090169944, 2.1125013736, 2.3159857529, 2.5330711732, 2.7501565936, 2.2627416998, 2.4813708499, 2.7, 2.9311388301, 3.1622776602, 3.4052824648, 3.6482872694, 4.1569219382, 4.4220692981, 4.6872166581, 4.9627684998, 5.2383203415, 5.5238976804, 5.8094750193, 5.2784609691, 5.56335454, 5.8482481108, 6.14289245, 6.4375367891, 6.7416141476, 7.045691506, 6.4, 6.7046397818, 7.0092795636, 7.3230164002, 7.6367532368, 7.9593306148, 8.2819079927, 7.672135955, 7.9942401082, 8.3163442615, 8.6470891078, 8.9778339542, 9.3169971012, 9.6561602482, 8.94427191, 9.2838404347, 9.6234089594, 9.9711618155, 10.3189146716, 10.6746635876, 11.0304125036];
    #[rustfmt::skip]
    let down: [f64; 12] = [0.2257514162, 0.4670319965, 0.8071908419, 1.9649649786, 2.5218201019, 3.1225402273, 4.8093649421, 5.5528304749, 6.3293074798, 8.4184827122, 9.3091254617, 10.2274676987];
    let xs: Vec<f32> = (0..24).map(|v| (v as f32).powf(1.5) / 10.0).collect();
    let x = Tensor::from_slice(&xs, &[1, 2, 3, 4]).unwrap();
    assert_close("nearest", &x.upsample_nearest2d([5, 7]).unwrap().to_vec().unwrap(), &nearest, 1e-5);
    assert_close("bilinear", &x.upsample_bilinear2d([5, 7], false).unwrap().to_vec().unwrap(), &bilinear, 1e-5);
    assert_close("bilinear, align_corners", &x.upsample_bilinear2d([5, 7], true).unwrap().to_vec().unwrap(), &corners, 1e-5);
    assert_close("bilinear down", &x.upsample_bilinear2d([2, 3], false).unwrap().to_vec().unwrap(), &down, 1e-5);
    // max_pool2d's switches unpooled: torch gives these for this 4 x 4 input pooled 2 x 2, values times 10.
    let inp = Tensor::from_slice(&[1., 5., 2., 0., 3., 4., 8., 1., 0., 2., 6., 7., 9., 1., 3., 2.], &[1, 1, 4, 4]).unwrap();
    let (p, idx) = inp.max_pool2d(Pool2dGeom::square(2)).unwrap();
    assert_eq!(idx.to_vec_u32().unwrap(), vec![1, 6, 12, 11]);
    let up = p.scale(10.0).unwrap().max_unpool2d(&idx, Pool2dGeom::square(2), [4, 4]).unwrap();
    assert_eq!(up.to_vec().unwrap(), vec![0., 50., 0., 0., 0., 0., 80., 0., 0., 0., 0., 70., 90., 0., 0., 0.]);
    let e = p.max_unpool2d(&idx, Pool2dGeom::square(2), [5, 6]).unwrap_err().to_string();
    assert!(e.contains("output_size"), "{e}");
}

#[test]
fn upsampling_and_unpooling_match_finite_differences() {
    use kiln_graph::cpu::CpuTensor;
    // The f64 references: each output a weighted sum of input pixels (PyTorch's source-index rules written out
    // again here, independently of vision::linear_taps).
    fn taps(inp: usize, out: usize, mode: u8) -> Vec<(usize, usize, f64)> {
        (0..out)
            .map(|d| {
                let src = match mode {
                    0 => return (((d as f64) * inp as f64 / out as f64).floor().min(inp as f64 - 1.0) as usize, 0, 0.0),
                    1 => ((d as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0),
                    _ => {
                        if out > 1 {
                            d as f64 * (inp - 1) as f64 / (out - 1) as f64
                        } else {
                            0.0
                        }
                    }
                };
                let lo = (src.floor() as usize).min(inp - 1);
                (lo, (lo + 1).min(inp - 1), src - lo as f64)
            })
            .collect()
    }
    fn resample(x: &CpuTensor, size: [usize; 2], mode: u8) -> CpuTensor {
        let s = &x.shape;
        let (th, tw) = (taps(s[2], size[0], mode), taps(s[3], size[1], mode));
        let mut y = Vec::new();
        for p in 0..s[0] * s[1] {
            let at = |r: usize, c: usize| x.data[(p * s[2] + r) * s[3] + c];
            for &(r0, r1, fr) in &th {
                for &(c0, c1, fc) in &tw {
                    let top = at(r0, c0) * (1.0 - fc) + at(r0, c1) * fc;
                    let bottom = at(r1, c0) * (1.0 - fc) + at(r1, c1) * fc;
                    y.push(top * (1.0 - fr) + bottom * fr);
                }
            }
        }
        CpuTensor::new(y, &[s[0], s[1], size[0], size[1]])
    }
    for (mode, size) in [(0u8, [7, 5]), (1, [8, 11]), (2, [8, 11]), (1, [2, 3])] {
        check_op(
            &format!("upsample mode {mode} to {size:?}"),
            &[(&[2, 3, 4, 5], Domain::Any)],
            |x| match mode {
                0 => x[0].upsample_nearest2d(size),
                m => x[0].upsample_bilinear2d(size, m == 2),
            },
            |x| resample(&x[0], size, mode),
        );
    }
    // max_unpool2d at the switches of a random map pooled 3 x 3 at stride 2 (overlapping windows: a switch
    // may repeat, and its values add up).
    let mut rng = test_rng("unpool_switches");
    let map = Tensor::from_slice(&kiln_tests::random_values(2 * 2 * 7 * 7, Domain::Any, &mut rng).iter().map(|&v| v as f32).collect::<Vec<_>>(), &[2, 2, 7, 7]).unwrap();
    let geom = Pool2dGeom::new(3, 2, 0);
    let (_, idx) = map.max_pool2d(geom).unwrap();
    let switches = idx.to_vec_u32().unwrap();
    check_op(
        "max_unpool2d",
        &[(&[2, 2, 3, 3], Domain::Any)],
        |x| x[0].max_unpool2d(&idx, geom, [7, 7]),
        |x| {
            let mut y = vec![0.0; 2 * 2 * 49];
            for (i, (&v, &s)) in x[0].data.iter().zip(&switches).enumerate() {
                y[(i / 9) * 49 + s as usize] += v;
            }
            CpuTensor::new(y, &[2, 2, 7, 7])
        },
    );
}

#[test]
fn detection_and_segmentation_losses_equal_torch() {
    use kiln_graph::loss::{dice_loss, pixel_cross_entropy, sigmoid_focal_loss, smooth_l1_loss, CrossEntropyOptions};
    require_gpu();
    // Values and gradients from torch 2.15 / torchvision 0.29.2 on the same inputs (f64).
    let p: Vec<f32> = (0..12).map(|v| v as f32 / 4.0 - 1.3).collect();
    let t: Vec<f32> = (0..12).map(|v| -1.0 + 2.0 * v as f32 / 11.0).collect();
    let tt = Tensor::from_slice(&t, &[3, 4]).unwrap();
    #[rustfmt::skip]
    let smooth: [(f32, f64, [f64; 12]); 2] = [
        (0.5, 0.06102272727272728, [-0.05, -0.0386363636, -0.0272727273, -0.0159090909, -0.0045454545, 0.0068181818, 0.0181818182, 0.0295454545, 0.0409090909, 0.0522727273, 0.0636363636, 0.075]),
        (0.0, 0.21136363636363634, [-0.0833333333, -0.0833333333, -0.0833333333, -0.0833333333, -0.0833333333, 0.0833333333, 0.0833333333, 0.0833333333, 0.0833333333, 0.0833333333, 0.0833333333, 0.0833333333]),
    ];
    for (beta, value, grad) in smooth {
        let pt = Tensor::from_slice(&p, &[3, 4]).unwrap().var();
        let l = smooth_l1_loss(&pt, &tt, beta).unwrap();
        assert_close(&format!("smooth_l1_loss beta {beta}"), &l.to_vec().unwrap(), &[value], 1e-5);
        assert_close("its gradient", &l.backward().unwrap().get(&pt).unwrap().to_vec().unwrap(), &grad, 1e-4);
    }
    // sigmoid_focal_loss(x, targets, alpha=0.25, gamma=2, reduction="mean")
    let x = Tensor::from_slice(&(0..12).map(|v| v as f32 / 3.0 - 2.0).collect::<Vec<_>>(), &[3, 4]).unwrap().var();
    let targets = Tensor::from_slice(&[1., 0., 0., 1., 0., 1., 1., 0., 1., 1., 0., 0.], &[3, 4]).unwrap();
    let l = sigmoid_focal_loss(&x, &targets, 0.25, 2.0).unwrap();
    assert_close("sigmoid_focal_loss", &l.to_vec().unwrap(), &[0.2253710318408729], 1e-5);
    #[rustfmt::skip]
    assert_close("its gradient", &l.backward().unwrap().get(&x).unwrap().to_vec().unwrap(), &[-0.0224315361, 0.000709722, 0.0015745737, -0.0160048901, 0.0063789353, -0.0092761542, -0.0062143082, 0.0278284627, -0.0021263118, -0.0010954402, 0.0565742702, 0.0630412662], 1e-4);
    // cross_entropy on [2, 3, 2, 3] logits (2 sin(i)), class weights (0.5, 2, 1), ignore_index 255, smoothing 0.1.
    let lg = Tensor::from_slice(&(0..36).map(|v| 2.0 * (v as f32).sin()).collect::<Vec<_>>(), &[2, 3, 2, 3]).unwrap().var();
    let labels = Tensor::from_u32(&[0, 1, 2, 2, 255, 1, 1, 1, 0, 255, 2, 0], &[2, 2, 3]).unwrap();
    let w = Tensor::from_slice(&[0.5, 2.0, 1.0], &[3]).unwrap();
    let opts = CrossEntropyOptions { ignore_index: Some(255), label_smoothing: 0.1 };
    let l = pixel_cross_entropy(&lg, &labels, Some(&w), opts).unwrap();
    assert_close("pixel cross-entropy", &l.to_vec().unwrap(), &[1.057931745527161], 1e-5);
    #[rustfmt::skip]
    assert_close("its gradient", &l.backward().unwrap().get(&lg).unwrap().to_vec().unwrap(), &[-0.0136458345, 0.0709244136, 0.022943513, 0.0134868261, 0.0, 0.0512462148, 0.0082130072, -0.0993709308, 0.0231592753, 0.0201489982, 0.0, -0.1008996571, 0.0054328274, 0.0284465172, -0.0461027883, -0.0336358242, 0.0, 0.0496534423, 0.0637349453, 0.0794133288, -0.0169635759, 0.0, 0.0129799698, -0.027785569, -0.1015701591, -0.1034152641, 0.0097452848, 0.0, 0.0197124026, 0.008422735, 0.0378352138, 0.0240019353, 0.0072182911, 0.0, -0.0326923725, 0.019362834], 1e-4);
    // Dice (eps 1e-3) of the softmax against one-hot labels (the ignored pixels as class 0).
    let one_hot: Vec<f32> = {
        let lab = [0u32, 1, 2, 2, 0, 1, 1, 1, 0, 0, 2, 0];
        (0..36)
            .map(|i| {
                let (b, c, px) = (i / 18, (i / 6) % 3, i % 6);
                (lab[b * 6 + px] == c as u32) as u8 as f32
            })
            .collect()
    };
    let d = dice_loss(&lg.softmax(1).unwrap(), &Tensor::from_slice(&one_hot, &[2, 3, 2, 3]).unwrap(), 1e-3).unwrap();
    assert_close("dice loss", &d.to_vec().unwrap(), &[0.6430683338589281], 1e-5);
    #[rustfmt::skip]
    assert_close("its gradient", &d.backward().unwrap().get(&lg).unwrap().to_vec().unwrap(), &[-0.0188135609, 0.0126137676, 0.0092934125, 0.0081605812, -0.0120859628, 0.0086663317, 0.0112875709, -0.0189927547, 0.0110197855, 0.0141322543, 0.0037096716, -0.0188835153, 0.0075259899, 0.0063789871, -0.020313198, -0.0222928355, 0.0083762912, 0.0102171836, 0.0107196887, 0.012985532, -0.0186816674, -0.0151098462, 0.008063421, -0.012711369, -0.0186258234, -0.0180866248, 0.0107113761, 0.0064377774, 0.0142084773, 0.0040738749, 0.0079061348, 0.0051010928, 0.0079702913, 0.0086720688, -0.0222718983, 0.0086374941], 1e-4);
    let e = pixel_cross_entropy(&lg, &Tensor::from_u32(&[0; 6], &[2, 3]).unwrap(), None, CrossEntropyOptions::default()).unwrap_err().to_string();
    assert!(e.contains("[2, 3, 2, 3]") && e.contains("[2, 3]"), "{e}");
}

#[test]
fn roi_pool_equals_torchvision_and_finite_differences() {
    require_gpu();
    // torchvision.ops.roi_pool(x, boxes, (2, 3), spatial_scale=0.5) with x = 3 sin(arange(120)) as
    // [2, 2, 5, 6]; the third box has x2 < x1 (one pixel), the second and fourth hang over the image.
    let x: Vec<f32> = (0..120).map(|v| 3.0 * (v as f32).sin()).collect();
    let rois = [0.0, 0.6, 1.2, 4.4, 3.5, 1.0, -2.0, -1.0, 3.0, 7.0, 0.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.3, 0.2, 11.0, 9.0];
    let xt = Tensor::from_slice(&x, &[2, 2, 5, 6]).unwrap().var();
    let rt = Tensor::from_slice(&rois, &[4, 5]).unwrap();
    let y = xt.roi_pool(&rt, [2, 3], 0.5).unwrap();
    #[rustfmt::skip]
    let want = [-0.8382464946, 1.9709597962, 2.9680747399, -1.609718754, 1.2605011105, 2.9718220671, -2.9753365603, -1.9306144001, 0.8891057361, -2.7495646437, -2.4953242279, 0.0531057753, -0.0796534621, -0.0796534621, -2.2175420899, 2.1995709602, 2.1995709602, -0.5282268598, 2.9507632363, 2.9507632363, 1.1388232171, 2.9844803741, 2.9844803741, 2.8363060021, 2.9680747399, 2.9680747399, 2.9680747399, 2.9680747399, 2.9680747399, 2.9680747399, 0.8891057361, 0.8891057361, 0.8891057361, 0.8891057361, 0.8891057361, 0.8891057361, -2.0303158707, 2.7600781146, 2.9985604757, -0.5282268598, 0.9396863473, 2.9050933833, 1.8689658943, -0.7357559564, 2.0497851442, 2.8363060021, -2.0690938228, -0.2915457177];
    assert_close("torchvision roi_pool", &y.to_vec().unwrap(), &want, 1e-5);
    // The gradient of sum(y * (arange(48) / 10 - 1)): each bin's weight at its maximum, summed where bins share one.
    let w: Vec<f32> = (0..48).map(|v| v as f32 / 10.0 - 1.0).collect();
    let grads = y.mul(&Tensor::from_slice(&w, &[4, 2, 2, 3]).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    #[rustfmt::skip]
    let want_grad = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -0.9, 9.1, 0.0, 0.0, 0.0, -0.7, -0.6, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.4, -0.3, 13.3, 0.0, 0.0, 0.0, -0.1, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 0.0, 2.7, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.6, 0.0, 0.0, 0.0, 2.8, 0.0, 0.0, 0.0, 0.0, 3.0, 3.1, 1.1, 3.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.3, 3.4, 1.7, 1.0, 0.0, 0.0, 0.0, 0.0, 2.3, 3.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.7, 0.0, 4.8, 0.0, 3.6, 0.0, 0.0];
    assert_close("torchvision roi_pool gradient", &grads.get(&xt).unwrap().to_vec().unwrap(), &want_grad, 1e-5);
    // Random maps (distinct values 0.01 apart, so a bump of 1e-3 moves no maximum) and boxes: finite
    // differences of the pooled values against the gradient at probed pixels.
    let mut rng = test_rng("roi_pool_random");
    let rois = random_rois(9, 2, 26.0, 22.0, &mut rng);
    let rt = Tensor::from_slice(&rois, &[9, 5]).unwrap();
    let mut vals: Vec<f32> = (0..2 * 3 * 11 * 13).map(|i| i as f32 * 0.01).collect();
    rng.shuffle(&mut vals);
    let xr = Tensor::from_slice(&vals, &[2, 3, 11, 13]).unwrap().var();
    let y = xr.roi_pool(&rt, [3, 2], 0.5).unwrap();
    let gy = Tensor::from_slice(&kiln_tests::random_values(y.numel(), Domain::Any, &mut rng).iter().map(|&v| v as f32).collect::<Vec<_>>(), y.shape()).unwrap();
    let gx = y.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap().get(&xr).unwrap().to_vec().unwrap();
    let base = y.to_vec().unwrap();
    for probe in [0usize, 17, 100, 400, 701, 857] {
        let mut bumped = vals.clone();
        bumped[probe] += 1e-3;
        let yb = Tensor::from_slice(&bumped, &[2, 3, 11, 13]).unwrap().roi_pool(&rt, [3, 2], 0.5).unwrap().to_vec().unwrap();
        let fd: f64 = yb.iter().zip(&base).zip(gy.to_vec().unwrap()).map(|((a, b), g)| (*a as f64 - *b as f64) / 1e-3 * g as f64).sum();
        assert!((fd - gx[probe] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "pixel {probe}: finite difference {fd}, gradient {}", gx[probe]);
    }
    let e = xr.roi_pool(&Tensor::from_slice(&[0.0; 4], &[1, 4]).unwrap(), [2, 2], 1.0).unwrap_err().to_string();
    assert!(e.contains("roi_pool") && e.contains("[k, 5]"), "{e}");
}

/// A bin that spans a 300 x 301 map (90,300 pixels: past lavapipe's 65,535-iteration loop cap, so CPU adapters
/// scan it in bands of rows) and one that lies in the last band only: the maximum by brute force, and ties
/// going to the first maximum in row-major order (torchvision's strict >), seen through the gradient.
#[test]
fn roi_pool_over_a_bin_larger_than_the_loop_cap_is_exact() {
    require_gpu();
    let (h, w) = (300, 301);
    let mut rng = test_rng("roi_pool_huge_bin");
    let mut x: Vec<f32> = (0..2 * h * w).map(|i| i as f32 * 1e-3).collect();
    rng.shuffle(&mut x);
    // Ties: channel 0 at (10, 7) and (250, 5), in different bands; channel 1 at (220, 3) and (260, 1).
    for (c, y, xx) in [(0, 10, 7), (0, 250, 5), (1, 220, 3), (1, 260, 1)] {
        x[(c * h + y) * w + xx] = 1000.0;
    }
    // The second box (rows 250.., columns 10..=200) misses the ties; its channel-0 maximum is planted.
    x[(270) * w + 100] = 500.0;
    let rois = [0.0, 0.0, 0.0, 300.0, 299.0, 0.0, 10.0, 250.0, 200.0, 299.0];
    let xt = Tensor::from_slice(&x, &[1, 2, h, w]).unwrap().var();
    let rt = Tensor::from_slice(&rois, &[2, 5]).unwrap();
    let y = xt.roi_pool(&rt, [1, 1], 1.0).unwrap();
    let brute = |c: usize, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| -> f64 {
        rows.flat_map(|r| cols.clone().map(move |q| (r, q))).map(|(r, q)| x[(c * h + r) * w + q] as f64).fold(f64::MIN, f64::max)
    };
    let want = [brute(0, 0..h, 0..w), brute(1, 0..h, 0..w), brute(0, 250..h, 10..201), brute(1, 250..h, 10..201)];
    assert_eq!(want[..3], [1000.0, 1000.0, 500.0]);
    assert_close("roi_pool over huge bins", &y.to_vec().unwrap(), &want, 0.0);
    let gx = y.sum_all().unwrap().backward().unwrap().get(&xt).unwrap().to_vec().unwrap();
    let at = |c: usize, r: usize, q: usize| gx[(c * h + r) * w + q];
    // The second box's bin, in the last band only, found its maximum there.
    assert_eq!(at(0, 270, 100), 1.0);
    assert_eq!((at(0, 10, 7), at(0, 250, 5)), (1.0, 0.0), "channel 0's tie goes to the first row");
    assert_eq!((at(1, 220, 3), at(1, 260, 1)), (1.0, 0.0), "channel 1's tie goes to the first row");
    assert_eq!(gx.iter().sum::<f32>(), 4.0, "one pixel per bin");
}
