use kiln_graph::{Conv2dGeom, Pool2dGeom, Rng, Tensor};
fn t(name: &str, f: impl Fn()) { let g = kiln_wgpu::gpu().unwrap(); f(); g.sync().unwrap(); let s = std::time::Instant::now(); for _ in 0..3 { f(); g.sync().unwrap(); } println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 1e3 / 3.0); }
fn main() {
    let mut rng = Rng::new(1);
    let x = Tensor::randn(&[64, 1, 28, 28], 1.0, &mut rng).unwrap();
    let w1 = Tensor::randn(&[6, 1, 5, 5], 0.1, &mut rng).unwrap().var();
    let h = Tensor::randn(&[64, 6, 14, 14], 1.0, &mut rng).unwrap().var();
    let w2 = Tensor::randn(&[16, 6, 5, 5], 0.1, &mut rng).unwrap().var();
    let g1 = Conv2dGeom { padding: [2, 2], ..Default::default() };
    t("conv1 fwd", || { let _ = x.conv2d(&w1, g1).unwrap(); });
    t("conv2 fwd", || { let _ = h.conv2d(&w2, Conv2dGeom::default()).unwrap(); });
    t("conv1 fwd+bwd", || { let _ = x.conv2d(&w1, g1).unwrap().sum_all().unwrap().backward().unwrap(); });
    t("conv2 fwd+bwd", || { let _ = h.conv2d(&w2, Conv2dGeom::default()).unwrap().sum_all().unwrap().backward().unwrap(); });
    let a = Tensor::randn(&[64, 6, 28, 28], 1.0, &mut rng).unwrap().var();
    t("pool fwd+bwd", || { let _ = a.max_pool2d(Pool2dGeom::square(2)).unwrap().0.sum_all().unwrap().backward().unwrap(); });
    t("relu fwd+bwd", || { let _ = a.relu().unwrap().sum_all().unwrap().backward().unwrap(); });
    let f = Tensor::randn(&[64, 400], 1.0, &mut rng).unwrap();
    let wf = Tensor::randn(&[120, 400], 0.1, &mut rng).unwrap().var();
    t("fc1 fwd+bwd", || { let _ = f.matmul_t(&wf, false, true).unwrap().sum_all().unwrap().backward().unwrap(); });
    t("sum_all 64x6x28x28", || { let _ = a.sum_all().unwrap(); });
}
