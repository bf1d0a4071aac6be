//! `cargo bench -p kiln-benches`: the same suite as `kiln bench` (roofs, every kernel family validated against
//! a CPU reference and timed, whole training steps). KILN_BENCH_FILTER=matmul,step picks families,
//! KILN_BENCH_MATMUL=256,512 the square sizes, KILN_BENCH_JSON=out.json writes the records.

fn main() {
    std::env::set_var("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()));
    let g = match kiln_wgpu::gpu() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU: {e}");
            std::process::exit(1);
        }
    };
    let list = |var: &str| -> Vec<String> { std::env::var(var).map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default() };
    let mut opts = kiln_benches::suite::SuiteOptions { filter: list("KILN_BENCH_FILTER"), ..Default::default() };
    let sizes: Vec<usize> = list("KILN_BENCH_MATMUL").iter().filter_map(|s| s.parse().ok()).collect();
    if !sizes.is_empty() {
        opts.square = sizes;
    }
    println!("adapter: {}", g.adapter_name());
    let roofs = kiln_benches::suite::measure_roofs().expect("roofs");
    println!("compute roof (FMA chains): {:.1} GFLOP/s   memory roof (64 MiB copy): {:.2} GB/s", roofs.fma_gflops, roofs.copy_gbps);
    let mut table = kiln_benches::suite::Table::default();
    let records = kiln_benches::suite::run_suite(&opts, roofs, &mut |r| table.print(r)).expect("benchmark suite");
    if let Ok(path) = std::env::var("KILN_BENCH_JSON") {
        std::fs::write(&path, serde_json::to_string_pretty(&records).expect("records serialise")).expect("writing the JSON records");
    }
}
