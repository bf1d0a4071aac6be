//! `cargo bench -p kiln-benches`: matmul GFLOP/s on the adapter beside the CPU reference, and the MLP training
//! step. Wall time around a full GPU sync (timestamp queries come with the kernel-tuning work).

use kiln_benches::{cpu_matmul, median_ms};
use kiln_graph::{Rng, Tensor};

fn main() {
    std::env::set_var("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()));
    let gpu = match kiln_wgpu::gpu() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU: {e}");
            std::process::exit(1);
        }
    };
    println!("adapter: {}", gpu.adapter_name());
    println!("{:>6} {:>12} {:>12} {:>12}", "n", "gpu ms", "gpu GFLOP/s", "cpu GFLOP/s");
    let mut rng = Rng::new(1);
    // KILN_BENCH_MATMUL="1024,2048,4096" picks the sizes (the default suits lavapipe).
    let sizes: Vec<usize> = std::env::var("KILN_BENCH_MATMUL").ok().map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect()).unwrap_or_else(|| vec![256, 512, 1024]);
    for n in sizes {
        let a = Tensor::randn(&[n, n], 1.0, &mut rng).unwrap();
        let b = Tensor::randn(&[n, n], 1.0, &mut rng).unwrap();
        let gpu_ms = median_ms(2, 10, || {
            let c = a.matmul(&b).unwrap();
            gpu.sync().unwrap();
            drop(c);
        });
        let (ha, hb) = (a.to_vec().unwrap(), b.to_vec().unwrap());
        let mut hc = vec![0f32; n * n];
        let cpu_ms = median_ms(1, 5, || cpu_matmul(&ha, &hb, &mut hc, n, n, n));
        let flops = 2.0 * (n * n * n) as f64;
        println!("{n:>6} {gpu_ms:>12.3} {:>12.2} {:>12.2}", flops / gpu_ms / 1e6, flops / cpu_ms / 1e6);
    }
    let cfg = kiln_models::TrainConfig { epochs: Some(3), ..kiln_models::TrainConfig::new("mlp", "digits") };
    let r = kiln_models::run(&cfg, |_| {}).unwrap();
    println!("mlp 64-128-10 on digits, batch 32: {:.3} ms/step, {:.0} samples/s, {:.2} submits/step", r.ms_per_step, r.samples_per_s, r.submits_per_step);
}
