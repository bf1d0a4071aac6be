//! The kernel benchmark suite behind `kiln bench` and `cargo bench -p kiln-benches`.
//!
//! First the adapter's ceilings, measured on the spot: an FMA chain (compute roof) and a large copy (memory
//! roof). Then one table per kernel family: each (kernel, shape, variant) is run once, its output checked
//! against a CPU reference computed on the same inputs (plain Rust, multi-threaded, blocked), and only if it is
//! right timed: the median of `runs` calls after a warm-up, wall time around a GPU fence. A wrong variant is
//! reported as wrong and never timed; one whose single run exceeds the time budget is reported as skipped.

use std::time::Instant;

use kiln_graph::backend::gpu;
use kiln_graph::kernels::{self, BinaryKind, ConvLowering, MatmulShape, MatmulVariant, UnaryKind};
use kiln_graph::tune::{time_ms, time_ms_with, Timing};
use kiln_graph::{Conv2dGeom, KilnError, Pool2dGeom, Rng, Tensor};
use serde::Serialize;

pub const FAMILIES: [&str; 14] = ["matmul", "conv", "pool", "softmax", "elementwise", "reduce", "embedding", "recurrent", "attention", "step", "lm", "detection", "generative", "allreduce"];

/// One row of the benchmark, as `--json` writes it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Record {
    pub family: String,
    pub kernel: String,
    pub shape: Vec<usize>,
    pub variant: String,
    pub valid: bool,
    pub median_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// Achieved GFLOP/s over the compute roof, or GB/s over the memory roof.
    pub roof_fraction: Option<f64>,
    pub cpu_gflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_gbps: Option<f64>,
    pub adapter: String,
    /// How median_ms was taken: "gpu-timestamps" (the kernel's pass, GPU time only) or "wall-fence".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    /// Why a valid record has no time (over the budget), or what was wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_per_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ms_per_step: Option<f64>,
    /// Bind groups made per step after warm-up (0: the step's recording reuses cached ones throughout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_groups_per_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_s: Option<f64>,
    /// Language models: tokens (predicted characters) trained per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submits_per_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_allocated_after_first_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<u64>,
    /// A step's working set: the most bytes live at once during the timed steps beyond what was live before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_peak_bytes: Option<u64>,
    /// Bytes of buffers and texture copies handed out per step (above `step_peak_bytes` when memory freed at a
    /// tensor's last use is handed out again within the step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_handed_out_per_step: Option<f64>,
}

/// Prints records as one table per family (what `kiln bench` and `cargo bench` show).
#[derive(Default)]
pub struct Table {
    family: String,
}

impl Table {
    pub fn print(&mut self, r: &Record) {
        if r.family != self.family {
            self.family = r.family.clone();
            println!("\n== {}", self.family);
            if self.family == "lm" {
                println!("{:<54} {:<12} {:>18} {:>18} {:>12} {:>23}", "kernel", "shape", "time", "throughput", "rate", "peak");
            } else if self.family == "step" {
                println!(
                    "{:<30} {:<22} {:>10} {:>9} {:>10} {:>8} {:>8} {:>12} {:>12} {:>7} {:>8}",
                    "kernel", "variant", "ms/step", "host ms", "samples/s", "submits", "GFLOP/s", "alloc after", "peak bytes", "roof", "new bgs"
                );
            } else {
                println!("{:<44} {:<22} {:<16} {:>10} {:>10} {:>7} {:>10}", "kernel", "shape", "variant", "ms", "rate", "roof", "cpu rate");
            }
        }
        let fmt = |v: Option<f64>, unit: &str| v.map(|x| format!("{x:.2} {unit}")).unwrap_or_else(|| "-".into());
        if r.family == "lm" {
            println!(
                "{:<54} {:<12} {:>10.1} ms/step {:>9.0} tokens/s {:>7.2} GF/s {:>12} peak bytes",
                r.kernel,
                format!("{:?}", r.shape),
                r.ms_per_step.unwrap_or(0.0),
                r.tokens_per_s.unwrap_or(0.0),
                r.gflops.unwrap_or(0.0),
                r.peak_gpu_bytes.unwrap_or(0)
            );
            return;
        }
        if r.family == "step" {
            println!(
                "{:<30} {:<22} {:>10.3} {:>9.3} {:>10.0} {:>8.2} {:>8.2} {:>12} {:>12} {:>6.1}% {:>8.1}",
                r.kernel,
                r.variant,
                r.ms_per_step.unwrap_or(0.0),
                r.host_ms_per_step.unwrap_or(0.0),
                r.samples_per_s.unwrap_or(0.0),
                r.submits_per_step.unwrap_or(0.0),
                r.gflops.unwrap_or(0.0),
                r.bytes_allocated_after_first_step.unwrap_or(0),
                r.peak_gpu_bytes.unwrap_or(0),
                100.0 * r.roof_fraction.unwrap_or(0.0),
                r.bind_groups_per_step.unwrap_or(0.0)
            );
            return;
        }
        let (rate, cpu) = if r.gbps.is_some() || r.cpu_gbps.is_some() { (fmt(r.gbps, "GB/s"), fmt(r.cpu_gbps, "GB/s")) } else { (fmt(r.gflops, "GF/s"), fmt(r.cpu_gflops, "GF/s")) };
        let shape = format!("{:?}", r.shape);
        let ms = match (r.valid, r.median_ms) {
            (false, _) => "WRONG".to_string(),
            (true, Some(ms)) => format!("{ms:.3}"),
            (true, None) => "not timed".to_string(),
        };
        let roof = r.roof_fraction.map(|f| format!("{:.1}%", 100.0 * f)).unwrap_or_else(|| "-".into());
        println!("{:<44} {:<22} {:<16} {:>10} {:>10} {:>7} {:>10}", r.kernel, shape, r.variant, ms, rate, roof, cpu);
        if let Some(note) = &r.note {
            println!("    {note}");
        }
    }
}

pub struct SuiteOptions {
    /// Families to run (empty: all).
    pub filter: Vec<String>,
    /// Timed runs per record (at least 10).
    pub runs: usize,
    /// A record whose single run takes longer than budget_s / runs is skipped (reported, not timed).
    pub budget_s: f64,
    /// Square matmul sizes.
    pub square: Vec<usize>,
    /// Models whose step shapes (and, under `step`, whole steps) are timed.
    pub models: Vec<String>,
    pub batch: usize,
    /// LSTM layers (batch, steps, hidden), timed forward + backward fused and composed.
    pub lstm: Vec<(usize, usize, usize)>,
    /// Attentions (batch x heads, sequence length), head size 64, causal and not, fused and composed.
    pub attention: Vec<(usize, usize)>,
    /// Windows per language-model training step (`lm`; the models' default is 32).
    pub lm_batch: usize,
    /// Box counts for NMS (`detection`).
    pub nms: Vec<usize>,
    /// RoI-Align: (RoIs, channels, map side), 7 x 7 bins of 2 x 2 samples.
    pub roi_align: Vec<(usize, usize, usize)>,
    /// Scene sides whose detector and segmenter training steps are timed (`detection`, batch 16): 64 is the
    /// examples' scenes of 1-3 digits, 128 the data set's defaults (2-6 objects, 20 classes).
    pub scene_sides: Vec<usize>,
    /// Their batch (the 16).
    pub scene_batch: usize,
    /// The side of the style-transfer iteration's image (`generative`).
    pub style_side: usize,
    /// All-reduce (`allreduce`): logical devices, and message sizes in bytes.
    pub allreduce_devices: Vec<usize>,
    pub allreduce_bytes: Vec<usize>,
    /// Data-parallel training steps over two devices (`allreduce`): (model, per-device batch).
    pub parallel_steps: Vec<(String, usize)>,
    /// One rank of a distributed benchmark (`kiln bench --filter allreduce --distributed mpi` under `mpirun`):
    /// `allreduce` then times the all-reduce between the ranks, one device each, instead of devices in one process.
    pub across: Option<kiln_nn::parallel::Distributed>,
}

/// The full suite (`kiln bench --full`): every size and model, records of up to 20 s.
impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            filter: Vec::new(),
            runs: 10,
            budget_s: 20.0,
            square: vec![256, 512, 1024, 2048],
            models: vec!["mlp".into(), "lenet".into(), "resnet20".into()],
            batch: 64,
            lstm: vec![(64, 64, 256), (64, 64, 512)],
            // Fewer batch-heads as T grows (64 at 128 and 256, 8 at 1024, 1 at 4096): on a CPU adapter the fused
            // pass at 64 x 4096 would take many minutes (and runs in chunks of 272 keys past lavapipe's loop cap).
            attention: vec![(64, 128), (64, 256), (8, 1024), (1, 4096)],
            lm_batch: 32,
            nms: vec![1000, 10_000, 100_000],
            roi_align: vec![(512, 256, 64)],
            scene_sides: vec![64, 128],
            scene_batch: 16,
            style_side: 512,
            allreduce_devices: vec![2, 4],
            // 4 KiB to 1 GiB, by fours.
            allreduce_bytes: (0..10).map(|i| 4096usize << (2 * i)).collect(),
            parallel_steps: vec![("resnet20".into(), 64), ("resnet50".into(), 2)],
            across: None,
        }
    }
}

impl SuiteOptions {
    /// What `kiln bench` runs without `--full`: every family and kernel variant, on two square sizes and the
    /// MLP's and LeNet-5's step shapes, records of up to 3 s (about a minute on lavapipe).
    pub fn quick() -> SuiteOptions {
        SuiteOptions {
            budget_s: 3.0,
            square: vec![256, 512],
            models: vec!["mlp".into(), "lenet".into()],
            lstm: vec![(32, 64, 128)],
            attention: vec![(8, 256)],
            nms: vec![1000, 10_000],
            roi_align: vec![(64, 32, 32)],
            scene_sides: vec![64],
            style_side: 128,
            allreduce_devices: vec![2],
            allreduce_bytes: (0..6).map(|i| 4096usize << (2 * i)).collect(),
            parallel_steps: vec![("resnet20".into(), 32)],
            ..SuiteOptions::default()
        }
    }
}

/// The adapter's ceilings.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Roofs {
    pub fma_gflops: f64,
    pub copy_gbps: f64,
}

struct Ctx<'a> {
    opts: &'a SuiteOptions,
    roofs: Roofs,
    adapter: String,
    emit: &'a mut dyn FnMut(&Record),
    out: Vec<Record>,
}

type R<T> = Result<T, KilnError>;

impl Ctx<'_> {
    fn push(&mut self, r: Record) {
        (self.emit)(&r);
        self.out.push(r);
    }

    fn base(&self, family: &str, kernel: &str, shape: &[usize], variant: &str) -> Record {
        Record { family: family.into(), kernel: kernel.into(), shape: shape.to_vec(), variant: variant.into(), adapter: self.adapter.clone(), ..Default::default() }
    }

    #[allow(clippy::too_many_arguments)]
    fn measure(&mut self, rec: Record, work: f64, bytes: bool, want: &[f32], tol: f32, cpu_ms: Option<f64>, run: impl FnMut() -> R<Tensor>) -> R<()> {
        // What is being timed, on one line that the next overwrites (a terminal only).
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\r\x1b[2Ktiming {} {} {}", rec.family, rec.kernel, rec.variant);
        }
        let rec = validate_and_time(rec, Work { amount: work, bytes }, want, tol, cpu_ms, self.roofs, self.opts.runs, self.opts.budget_s, run)?;
        self.push(rec);
        Ok(())
    }
}

/// What a kernel does per call: FLOPs (compute-bound), or bytes moved when `bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Work {
    pub amount: f64,
    pub bytes: bool,
}

/// Runs `run` once and checks its output against `want` (every element within `tol` of the largest |want|).
/// A wrong result is reported as wrong and never timed; a right one is timed (median of `runs` after a
/// warm-up) unless one call would take the runs past `budget_s`. Rates go beside the roof and the CPU's.
#[allow(clippy::too_many_arguments)]
pub fn validate_and_time(mut rec: Record, work: Work, want: &[f32], tol: f32, cpu_ms: Option<f64>, roofs: Roofs, runs: usize, budget_s: f64, mut run: impl FnMut() -> R<Tensor>) -> R<Record> {
    let g = gpu()?;
    g.sync()?;
    let got = run()?.to_vec()?;
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let bad = got.len() != want.len() || got.iter().zip(want).any(|(a, b)| (a - b).is_nan() || (a - b).abs() > tol * scale);
    let cpu_rate = cpu_ms.map(|ms| work.amount / ms / 1e6);
    if work.bytes {
        rec.cpu_gbps = cpu_rate
    } else {
        rec.cpu_gflops = cpu_rate
    }
    if bad {
        let worst = if got.len() == want.len() { got.iter().zip(want).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max) } else { f32::INFINITY };
        rec.valid = false;
        rec.note = Some(format!("wrong: max error {worst:.2e} of the largest value (tolerance {tol:.0e}); not timed"));
        return Ok(rec);
    }
    rec.valid = true;
    // A second call, past pipeline creation and shader compilation, decides whether timing fits the budget.
    let t0 = Instant::now();
    run()?;
    g.sync()?;
    let one_s = t0.elapsed().as_secs_f64();
    let runs = runs.max(10);
    if one_s * runs as f64 > budget_s {
        rec.note = Some(format!("not timed: one run takes {one_s:.2} s, {runs} runs exceed the budget (raise --budget-s)"));
        return Ok(rec);
    }
    let (ms, timing) = time_ms_with(gpu()?, 1, runs, || run().map(drop))?;
    rec.median_ms = Some(ms);
    rec.timing = Some(timing);
    let rate = work.amount / ms / 1e6;
    if work.bytes {
        rec.gbps = Some(rate);
        rec.roof_fraction = Some(rate / roofs.copy_gbps);
    } else {
        rec.gflops = Some(rate);
        rec.roof_fraction = Some(rate / roofs.fma_gflops);
    }
    Ok(rec)
}

/// Runs the suite against ceilings from [`measure_roofs`]; `emit` sees each record as it is measured.
pub fn run_suite(opts: &SuiteOptions, roofs: Roofs, emit: &mut dyn FnMut(&Record)) -> R<Vec<Record>> {
    let g = gpu()?;
    let mut ctx = Ctx { opts, roofs, adapter: g.adapter_name(), emit, out: Vec::new() };
    let families: [Family; 14] = [
        ("matmul", matmul_family),
        ("conv", conv_family),
        ("pool", pool_family),
        ("softmax", softmax_family),
        ("elementwise", elementwise_family),
        ("reduce", reduce_family),
        ("embedding", embedding_family),
        ("recurrent", recurrent_family),
        ("attention", attention_family),
        ("step", step_family),
        ("lm", lm_family),
        ("detection", detection_family),
        ("generative", generative_family),
        ("allreduce", allreduce_family),
    ];
    for (name, run) in families {
        if opts.filter.is_empty() || opts.filter.iter().any(|f| f == name) {
            eprintln!("kiln bench: {name}");
            run(&mut ctx)?;
        }
    }
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!("\r\x1b[2K");
    }
    Ok(ctx.out)
}

/// The compute roof (8 independent vec4 FMA chains per invocation, no memory traffic) and the memory roof
/// (a 64 MiB vec4 copy), best of several sizes.
pub fn measure_roofs() -> R<Roofs> {
    let g = gpu()?;
    let launch_roof = |entry: &'static str, n: u32, iters: u32, src: &kiln_graph::backend::BufView, dst: &kiln_graph::backend::BufView| -> R<()> {
        let p = kernels::Params::new().u32(n as usize).u32(iters as usize).f32(0.999).f32(0.001);
        let groups = n.div_ceil(256);
        let d = kiln_graph::backend::Dispatch {
            shader: &kernels::ROOF,
            entry,
            constants: &[("WG", 256.0)],
            params: p.bytes(),
            inputs: &[src],
            outputs: &[dst],
            textures: &[],
            workgroups: [groups.min(65535), groups.div_ceil(65535), 1],
        };
        g.dispatch(&d)?;
        Ok(())
    };
    let vec4s: u32 = 1 << 22; // 64 MiB per buffer
    let src = kernels::random_uniform(gpu()?, 4 * vec4s as usize, 3, 0)?;
    let dst = g.alloc(16 * vec4s as u64, "roof output")?;
    let mut fma: f64 = 0.0;
    // Four times the invocations each round until one run takes 100 ms: a big GPU needs millions of them in
    // flight (2^18 left an H200 at 60% of its FMA rate), lavapipe reaches its roof with far fewer.
    // 256 FLOPs per iteration of fma_roof.
    for threads in [1u32 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22] {
        let iters = 64;
        let ms = time_ms(gpu()?, 1, 5, || launch_roof("fma_roof", threads, iters, &src, &dst))?;
        fma = fma.max(threads as f64 * iters as f64 * 256.0 / ms / 1e6);
        if ms > 100.0 {
            break;
        }
    }
    let ms = time_ms(gpu()?, 1, 5, || launch_roof("copy_roof", vec4s, 0, &src, &dst))?;
    let copy = 2.0 * 16.0 * vec4s as f64 / ms / 1e6;
    Ok(Roofs { fma_gflops: fma, copy_gbps: copy })
}

fn randn(shape: &[usize], rng: &mut Rng) -> R<(Tensor, Vec<f32>)> {
    let t = Tensor::randn(shape, 1.0, rng)?;
    let h = t.to_vec()?;
    Ok((t, h))
}

/// Median wall time of `runs` calls of a CPU closure.
fn cpu_time(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

// ---- matmul -------------------------------------------------------------------------------------------

fn matmul_family(ctx: &mut Ctx) -> R<()> {
    let mut shapes: Vec<(String, MatmulShape)> = ctx.opts.square.iter().map(|&n| (format!("square {n}"), MatmulShape { batch: 1, m: n, n, k: n, trans_a: false, trans_b: false })).collect();
    for model in ctx.opts.models.clone() {
        let mut seen = std::collections::HashSet::new();
        for s in step_matmul_shapes(&model, ctx.opts.batch)? {
            if seen.insert(s) {
                shapes.push((format!("{model} step"), s));
            }
        }
    }
    let mut rng = Rng::new(5);
    for (kernel, s) in shapes {
        let a_shape = if s.trans_a { [s.batch, s.k, s.m] } else { [s.batch, s.m, s.k] };
        let b_shape = if s.trans_b { [s.n, s.k] } else { [s.k, s.n] };
        // The step's products broadcast B over the batch (a weight) or are plain 2-D.
        let (a, ha) = randn(&a_shape, &mut rng)?;
        let (b, hb) = randn(&b_shape, &mut rng)?;
        let mut want = vec![0f32; s.batch * s.m * s.n];
        let cpu_ms = cpu_time(3, || cpu_matmul_batched(&ha, &hb, &mut want, s));
        let shape = vec![s.batch, s.m, s.n, s.k];
        let kname = format!("{kernel} {}{}", if s.trans_a { "t" } else { "n" }, if s.trans_b { "t" } else { "n" });
        for v in MatmulVariant::ALL {
            if !v.supports(gpu()?, s.m, s.n, s.k, s.trans_a, s.trans_b)? {
                continue;
            }
            let rec = ctx.base("matmul", &kname, &shape, &v.name());
            let (av, bv) = (a.storage().clone(), b.storage().clone());
            let out_shape = vec![s.batch, s.m, s.n];
            ctx.measure(rec, s.flops(), false, &want, 1e-4, Some(cpu_ms), || {
                let c = kernels::matmul_with(v, &av, &bv, s.batch, s.m, s.n, s.k, s.m * s.k, 0, s.trans_a, s.trans_b)?;
                Tensor::from_storage(c, &out_shape, kiln_graph::DType::F32)
            })?;
        }
    }
    Ok(())
}

/// The matmuls one training step of `model` launches (forward, backward, on a random batch).
pub fn step_matmul_shapes(model: &str, batch: usize) -> R<Vec<MatmulShape>> {
    let (input, classes) = model_input(model);
    let mut vs = kiln_nn::VarStore::new(1);
    let mut net = kiln_models::zoo::build_named(&mut vs, model, input, classes, 1)?;
    vs.finish()?;
    use kiln_nn::{Layer, Module};
    net.set_training(true);
    let mut rng = Rng::new(3);
    let x = Tensor::randn(&[batch, input[0], input[1], input[2]], 1.0, &mut rng)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
    let y = Tensor::from_u32(&labels, &[batch])?;
    kernels::log_matmuls(true);
    let run = || -> R<()> {
        let l = kiln_graph::loss::cross_entropy(&net.forward(&x)?, &y)?;
        l.backward()?;
        Ok(())
    };
    let r = run();
    let shapes = kernels::log_matmuls(false);
    r?;
    gpu()?.sync()?;
    Ok(shapes)
}

/// Input size and classes the benchmarks use per model: MNIST-sized for LeNet, the MLP and CIFAR ResNets.
pub fn model_input(model: &str) -> ([usize; 3], usize) {
    let zoo = kiln_models::zoo::ZOO.iter().find(|z| z.0 == model).map(|z| z.1);
    let input = match zoo {
        Some(i) if !(model.starts_with("resnet") && i[1] == 32) => i,
        _ => [1, 28, 28],
    };
    (input, 10)
}

/// Row-major C = op(A) @ op(B) per batch (B shared), f32, rows split across the cores, blocked over k.
pub fn cpu_matmul_batched(a: &[f32], b: &[f32], c: &mut [f32], s: MatmulShape) {
    let (m, n, k) = (s.m, s.n, s.k);
    // Bring both operands to [m, k] / [k, n] first (the copies are O(n^2) beside O(n^3)).
    let bt: Vec<f32> = if s.trans_b { transpose(b, n, k) } else { b.to_vec() };
    for z in 0..s.batch {
        let az = &a[z * m * k..(z + 1) * m * k];
        let at: Vec<f32> = if s.trans_a { transpose(az, k, m) } else { az.to_vec() };
        cpu_matmul(&at, &bt, &mut c[z * m * n..(z + 1) * m * n], m, k, n);
    }
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// C[m, n] = A[m, k] B[k, n]: blocked i-k-j, rows split across the machine's cores.
pub fn cpu_matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    let threads = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1).min(m.max(1));
    let rows_per = m.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, chunk) in c.chunks_mut(rows_per * n.max(1)).enumerate() {
            s.spawn(move || {
                chunk.fill(0.0);
                let r0 = t * rows_per;
                const KB: usize = 256;
                for kb in (0..k).step_by(KB) {
                    for (ri, row) in chunk.chunks_mut(n.max(1)).enumerate() {
                        let arow = &a[(r0 + ri) * k..(r0 + ri + 1) * k];
                        for p in kb..(kb + KB).min(k) {
                            let av = arow[p];
                            for (cv, bv) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                                *cv += av * bv;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// Splits `out` into per-core chunks of whole `unit`s and runs `f(first_unit, chunk)` on each.
fn par_units(out: &mut [f32], unit: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let units = out.len() / unit.max(1);
    let threads = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1).min(units.max(1));
    let per = units.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per * unit.max(1)).enumerate() {
            let f = &f;
            s.spawn(move || f(t * per, chunk));
        }
    });
}

// ---- conv2d -------------------------------------------------------------------------------------------

/// A convolution layer of the suite: name, input [n, c, h, w], out channels, kernel, stride, padding.
type ConvLayer = (&'static str, [usize; 4], usize, usize, usize, usize);

/// (name, input [n, c, h, w], c_out, kernel, stride, padding): LeNet-5's two convolutions (28x28 input) and
/// ResNet-20's three 3x3 stages plus a strided one.
fn conv_layers(batch: usize) -> Vec<ConvLayer> {
    vec![
        ("lenet conv1", [batch, 1, 28, 28], 6, 5, 1, 2),
        ("lenet conv2", [batch, 6, 14, 14], 16, 5, 1, 0),
        ("resnet20 16@32x32", [batch, 16, 32, 32], 16, 3, 1, 1),
        ("resnet20 32@16x16 s2", [batch, 16, 32, 32], 32, 3, 2, 1),
        ("resnet20 32@16x16", [batch, 32, 16, 16], 32, 3, 1, 1),
        ("resnet20 64@8x8", [batch, 64, 8, 8], 64, 3, 1, 1),
    ]
}

fn conv_family(ctx: &mut Ctx) -> R<()> {
    let mut rng = Rng::new(9);
    for (name, xs, cout, kk, stride, pad) in conv_layers(ctx.opts.batch) {
        let geom = Conv2dGeom { stride: [stride, stride], padding: [pad, pad], ..Default::default() };
        let (x, hx) = randn(&xs, &mut rng)?;
        let (w, hw) = randn(&[cout, xs[1], kk, kk], &mut rng)?;
        let (oh, ow) = geom.output_size(xs[2], xs[3], kk, kk).expect("layer fits");
        let (gy, hg) = randn(&[xs[0], cout, oh, ow], &mut rng)?;
        let c = CpuConv { n: xs[0], c: xs[1], h: xs[2], w: xs[3], co: cout, k: kk, stride, pad, oh, ow };
        let flops = 2.0 * (xs[0] * cout * oh * ow * xs[1] * kk * kk) as f64;
        let shape = vec![xs[0], xs[1], xs[2], xs[3], cout, kk, stride];
        // Both lowerings where the gathering kernel runs (it needs subgroups): im2col columns in a buffer + the
        // tuned matmul, and the columns gathered inside the product (conv_gemm), the default on CPU adapters.
        let lowerings: &[(ConvLowering, &str)] = if MatmulVariant::Subgroup(8).supports(gpu()?, 1, 1, 1, false, false)? {
            &[(ConvLowering::Im2col, "im2col+matmul"), (ConvLowering::Implicit, "implicit (conv_gemm)")]
        } else {
            &[(ConvLowering::Im2col, "im2col+matmul")]
        };
        for &(lowering, variant) in lowerings {
            kernels::set_conv_lowering(gpu()?, lowering);
            let measured = (|| -> R<()> {
                // forward
                let mut want = Vec::new();
                let ms = cpu_time(3, || want = c.forward(&hx, &hw));
                let rec = ctx.base("conv", &format!("{name} forward"), &shape, variant);
                ctx.measure(rec, flops, false, &want, 1e-4, Some(ms), || kiln_graph::no_grad(|| x.conv2d(&w, geom)))?;
                // backward to the input
                let ms = cpu_time(3, || want = c.backward_input(&hg, &hw));
                let rec = ctx.base("conv", &format!("{name} backward-input"), &shape, variant);
                let xv = x.detach().var();
                let wd = w.detach();
                ctx.measure(rec, flops, false, &want, 1e-4, Some(ms), || Ok(kiln_graph::conv2d_grads(&xv, &wd, &gy, &geom)?.0.expect("input gradient")))?;
                // backward to the weight
                let ms = cpu_time(3, || want = c.backward_weight(&hx, &hg));
                let rec = ctx.base("conv", &format!("{name} backward-weight"), &shape, variant);
                let xd = x.detach();
                let wv = w.detach().var();
                ctx.measure(rec, flops, false, &want, 1e-4, Some(ms), || Ok(kiln_graph::conv2d_grads(&xd, &wv, &gy, &geom)?.1.expect("weight gradient")))?;
                Ok(())
            })();
            kernels::set_conv_lowering(gpu()?, ConvLowering::Auto);
            measured?;
        }
    }
    Ok(())
}

/// CPU conv2d by im2col + the blocked multi-threaded matmul (square kernel, no dilation, no groups).
struct CpuConv {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl CpuConv {
    /// Calls f(input index, column index) for every tap of sample b that lands inside the input, where the
    /// column matrix is cols[(ci, ky, kx), (oy, ox)].
    fn for_each_tap(&self, b: usize, mut f: impl FnMut(usize, usize)) {
        let sp = self.oh * self.ow;
        for ci in 0..self.c {
            for ky in 0..self.k {
                for kx in 0..self.k {
                    let row = (ci * self.k + ky) * self.k + kx;
                    for oy in 0..self.oh {
                        let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        for ox in 0..self.ow {
                            let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                            if ix >= 0 && ix < self.w as isize {
                                f(((b * self.c + ci) * self.h + iy as usize) * self.w + ix as usize, row * sp + oy * self.ow + ox);
                            }
                        }
                    }
                }
            }
        }
    }

    fn im2col(&self, x: &[f32], b: usize) -> Vec<f32> {
        let mut cols = vec![0f32; self.c * self.k * self.k * self.oh * self.ow];
        self.for_each_tap(b, |xi, ci| cols[ci] = x[xi]);
        cols
    }

    fn forward(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (kk, sp) = (self.c * self.k * self.k, self.oh * self.ow);
        let mut y = vec![0f32; self.n * self.co * sp];
        for b in 0..self.n {
            let cols = self.im2col(x, b);
            cpu_matmul(w, &cols, &mut y[b * self.co * sp..(b + 1) * self.co * sp], self.co, kk, sp);
        }
        y
    }

    fn backward_input(&self, g: &[f32], w: &[f32]) -> Vec<f32> {
        let (kk, sp) = (self.c * self.k * self.k, self.oh * self.ow);
        let wt = transpose(w, self.co, kk);
        let mut dx = vec![0f32; self.n * self.c * self.h * self.w];
        let mut dcols = vec![0f32; kk * sp];
        for b in 0..self.n {
            cpu_matmul(&wt, &g[b * self.co * sp..(b + 1) * self.co * sp], &mut dcols, kk, self.co, sp);
            // col2im: scatter-add each column entry back to its input pixel.
            self.for_each_tap(b, |xi, ci| dx[xi] += dcols[ci]);
        }
        dx
    }

    fn backward_weight(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let (kk, sp) = (self.c * self.k * self.k, self.oh * self.ow);
        let mut dw = vec![0f32; self.co * kk];
        let mut part = vec![0f32; self.co * kk];
        for b in 0..self.n {
            let cols_t = transpose(&self.im2col(x, b), kk, sp);
            cpu_matmul(&g[b * self.co * sp..(b + 1) * self.co * sp], &cols_t, &mut part, self.co, sp, kk);
            for (d, p) in dw.iter_mut().zip(&part) {
                *d += p;
            }
        }
        dw
    }
}

// ---- pooling, softmax, elementwise, reductions (memory-bound: GB/s) ---------------------------------------

fn pool_family(ctx: &mut Ctx) -> R<()> {
    let mut rng = Rng::new(13);
    let b = ctx.opts.batch;
    for (name, xs) in [("lenet pool1", [b, 6, 28, 28]), ("lenet pool2", [b, 16, 10, 10]), ("large", [b, 64, 32, 32])] {
        let geom = Pool2dGeom::square(2);
        let (x, hx) = randn(&xs, &mut rng)?;
        let (oh, ow) = (xs[2] / 2, xs[3] / 2);
        let planes = xs[0] * xs[1];
        let out_n = planes * oh * ow;
        let in_n = planes * xs[2] * xs[3];
        for max in [true, false] {
            let mut want = vec![0f32; out_n];
            let ms = cpu_time(3, || {
                par_units(&mut want, oh * ow, |p0, chunk| {
                    for (pi, plane) in chunk.chunks_mut(oh * ow).enumerate() {
                        let src = &hx[(p0 + pi) * xs[2] * xs[3]..];
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let v = [src[2 * oy * xs[3] + 2 * ox], src[2 * oy * xs[3] + 2 * ox + 1], src[(2 * oy + 1) * xs[3] + 2 * ox], src[(2 * oy + 1) * xs[3] + 2 * ox + 1]];
                                plane[oy * ow + ox] = if max { v.iter().copied().fold(f32::MIN, f32::max) } else { v.iter().sum::<f32>() / 4.0 };
                            }
                        }
                    }
                })
            });
            let kernel = format!("{name} {}-pool 2x2 forward", if max { "max" } else { "avg" });
            let rec = ctx.base("pool", &kernel, &xs, "direct");
            let bytes = 4.0 * (in_n + out_n * if max { 2 } else { 1 }) as f64;
            ctx.measure(rec, bytes, true, &want, 1e-6, Some(ms), || kiln_graph::no_grad(|| if max { Ok(x.max_pool2d(geom)?.0) } else { x.avg_pool2d(geom) }))?;
        }
        // Max-pool backward: the gradient goes to each window's argmax (the switches).
        let (_, switches) = kiln_graph::no_grad(|| x.max_pool2d(geom))?;
        let sw: Vec<u32> = bytemuck::cast_slice(&gpu()?.read(switches.storage())?).to_vec();
        let (gy, hg) = randn(&[xs[0], xs[1], oh, ow], &mut rng)?;
        let mut want = vec![0f32; in_n];
        let ms = cpu_time(3, || {
            par_units(&mut want, xs[2] * xs[3], |p0, chunk| {
                chunk.fill(0.0);
                for (pi, plane) in chunk.chunks_mut(xs[2] * xs[3]).enumerate() {
                    for o in 0..oh * ow {
                        let idx = (p0 + pi) * oh * ow + o;
                        plane[sw[idx] as usize] += hg[idx];
                    }
                }
            })
        });
        let rec = ctx.base("pool", &format!("{name} max-pool 2x2 backward"), &xs, "direct");
        ctx.measure(rec, 4.0 * (in_n + 2 * out_n) as f64, true, &want, 1e-6, Some(ms), || kiln_graph::pool2d_grad(&x, Some(&switches), &gy, &geom))?;
    }
    Ok(())
}

fn softmax_family(ctx: &mut Ctx) -> R<()> {
    let mut rng = Rng::new(17);
    for (rows, cols) in [(ctx.opts.batch, 10), (8192, 10), (4096, 1000), (256, 32768)] {
        let (x, hx) = randn(&[rows, cols], &mut rng)?;
        let mut want = vec![0f32; rows * cols];
        let ms = cpu_time(3, || {
            par_units(&mut want, cols, |r0, chunk| {
                for (ri, row) in chunk.chunks_mut(cols).enumerate() {
                    let src = &hx[(r0 + ri) * cols..(r0 + ri + 1) * cols];
                    let mx = src.iter().copied().fold(f32::MIN, f32::max);
                    let mut sum = 0.0;
                    for (o, v) in row.iter_mut().zip(src) {
                        *o = (v - mx).exp();
                        sum += *o;
                    }
                    row.iter_mut().for_each(|o| *o /= sum);
                }
            })
        });
        let variant = if cols > kernels::LOOP_CHUNK { "max/exp/sum/divide kernels" } else { "one row per invocation" };
        let rec = ctx.base("softmax", "softmax rows", &[rows, cols], variant);
        ctx.measure(rec, 8.0 * (rows * cols) as f64, true, &want, 1e-5, Some(ms), || kiln_graph::no_grad(|| x.softmax(1)))?;
    }
    Ok(())
}

fn elementwise_family(ctx: &mut Ctx) -> R<()> {
    let mut rng = Rng::new(19);
    let n = 1 << 22; // 16 MiB per operand
    let (a, ha) = randn(&[n], &mut rng)?;
    let (b, hb) = randn(&[n], &mut rng)?;
    let mut want = vec![0f32; n];
    let ms = cpu_time(3, || par_units(&mut want, 1, |i0, c| c.iter_mut().enumerate().for_each(|(i, o)| *o = ha[i0 + i].max(0.0))));
    let rec = ctx.base("elementwise", "relu", &[n], "unary");
    ctx.measure(rec, 8.0 * n as f64, true, &want, 0.0, Some(ms), || Tensor::from_storage(kernels::unary(UnaryKind::Relu, a.storage(), n, 0.0, 0.0)?, &[n], kiln_graph::DType::F32))?;
    let ms = cpu_time(3, || par_units(&mut want, 1, |i0, c| c.iter_mut().enumerate().for_each(|(i, o)| *o = ha[i0 + i] + hb[i0 + i])));
    let rec = ctx.base("elementwise", "add", &[n], "binary");
    ctx.measure(rec, 12.0 * n as f64, true, &want, 0.0, Some(ms), || {
        Tensor::from_storage(kernels::binary(BinaryKind::Add, a.storage(), &[n], b.storage(), &[n], &[n])?, &[n], kiln_graph::DType::F32)
    })?;
    // A bias add: [rows, cols] + [cols], the broadcasting path.
    let (rows, cols) = (n / 1024, 1024);
    let ms = cpu_time(3, || par_units(&mut want, cols, |r0, c| c.iter_mut().enumerate().for_each(|(i, o)| *o = ha[r0 * cols + i] + hb[i % cols])));
    let rec = ctx.base("elementwise", "add broadcast [rows, 1024] + [1024]", &[rows, cols], "binary");
    ctx.measure(rec, 8.0 * n as f64, true, &want, 0.0, Some(ms), || {
        Tensor::from_storage(kernels::binary(BinaryKind::Add, a.storage(), &[rows, cols], b.storage(), &[cols], &[rows, cols])?, &[n], kiln_graph::DType::F32)
    })?;
    Ok(())
}

fn reduce_family(ctx: &mut Ctx) -> R<()> {
    let mut rng = Rng::new(23);
    let (rows, cols) = (2048, 2048);
    let (x, hx) = randn(&[rows, cols], &mut rng)?;
    // Sum along rows (contiguous) and along columns (strided).
    for (axis_name, outer, axis, inner) in [("last axis", rows, cols, 1), ("first axis", 1, rows, cols)] {
        let mut want = vec![0f32; outer * inner];
        let ms = cpu_time(3, || {
            par_units(&mut want, 1, |o0, c| {
                for (i, o) in c.iter_mut().enumerate() {
                    let idx = o0 + i;
                    let (ou, inn) = (idx / inner, idx % inner);
                    *o = (0..axis).map(|a| hx[(ou * axis + a) * inner + inn]).sum();
                }
            })
        });
        let rec = ctx.base("reduce", &format!("sum over the {axis_name}"), &[rows, cols], "one output per invocation");
        let bytes = 4.0 * (rows * cols + outer * inner) as f64;
        ctx.measure(rec, bytes, true, &want, 1e-5, Some(ms), || Tensor::from_storage(kernels::reduce(x.storage(), outer, axis, inner, false, 1.0)?, &[outer * inner], kiln_graph::DType::F32))?;
    }
    Ok(())
}

// ---- embedding gradient ---------------------------------------------------------------------------------

/// An embedding's backward (index_select along axis 0): the counting-sort kernels (O(ids x dim)) against the
/// general kernel (O(rows x ids x dim)), for a character vocabulary and a word-sized one.
fn embedding_family(ctx: &mut Ctx) -> R<()> {
    let mut rng = Rng::new(17);
    let (dim, m) = (64, 64 * 64);
    for (name, rows) in [("chars", 87usize), ("words", 10_000)] {
        let ids: Vec<u32> = (0..m).map(|_| rng.below(rows) as u32).collect();
        let idx = Tensor::from_u32(&ids, &[m])?;
        let (g, hg) = randn(&[m, dim], &mut rng)?;
        let mut want = vec![0f32; rows * dim];
        let ms = cpu_time(3, || {
            want.fill(0.0);
            for (j, &r) in ids.iter().enumerate() {
                for d in 0..dim {
                    want[r as usize * dim + d] += hg[j * dim + d];
                }
            }
        });
        let bytes = 4.0 * (2 * m * dim + rows * dim) as f64;
        let shape = [rows, dim, m];
        for general in [false, true] {
            let rec = ctx.base("embedding", &format!("{name}: {rows} rows x {dim}, {m} ids, backward"), &shape, if general { "general" } else { "counting sort" });
            let (gv, iv) = (g.storage().clone(), idx.storage().clone());
            ctx.measure(rec, bytes, true, &want, 1e-4, Some(ms), || {
                let out = if general { kernels::index_select_backward_general(&gv, &iv, 1, rows, dim, m)? } else { kernels::embedding_backward(&gv, &iv, rows, dim, m)? };
                Tensor::from_storage(out, &[rows, dim], kiln_graph::DType::F32)
            })?;
        }
    }
    Ok(())
}

// ---- recurrent layers ---------------------------------------------------------------------------------

/// An LSTM layer (input size = hidden) forward and backward over a batch of sequences: the fused pass
/// (recurrent.wgsl: per step the recurrent matmul and one cell kernel each way) against the same equations in
/// composed ops. Its outputs are checked against the f64 reference (cpu::rnn_sequence after the input
/// projection), whose forward time gives the CPU rate (per FLOP, so the rates compare).
fn recurrent_family(ctx: &mut Ctx) -> R<()> {
    use kiln_graph::cpu::CpuTensor;
    use kiln_graph::rnn::CellKind;
    let mut rng = Rng::new(23);
    for (n, steps, hidden) in ctx.opts.lstm.clone() {
        let (gh, rows) = (4 * hidden, steps * n);
        let k = 1.0 / (hidden as f64).sqrt();
        let mut param = |shape: &[usize]| -> R<(Tensor, Vec<f32>)> {
            let t = Tensor::rand_uniform(shape, -k, k, &mut rng)?.var();
            let h = t.to_vec()?;
            Ok((t, h))
        };
        let ((x, hx), (w_ih, hw_ih), (w_hh, hw_hh), (b_ih, hb_ih), (b_hh, hb_hh)) = (param(&[steps, n, hidden])?, param(&[gh, hidden])?, param(&[gh, hidden])?, param(&[gh])?, param(&[gh])?);
        let mut want = Vec::new();
        let cpu_ms = cpu_time(1, || {
            let xg: Vec<f64> = (0..rows * gh).map(|i| hb_ih[i % gh] as f64 + (0..hidden).map(|j| hx[(i / gh) * hidden + j] as f64 * hw_ih[(i % gh) * hidden + j] as f64).sum::<f64>()).collect();
            let f = |v: &[f32], shape: &[usize]| CpuTensor::from_f32(v, shape);
            let zeros = CpuTensor::new(vec![0.0; n * hidden], &[n, hidden]);
            let (out, _, _) = kiln_graph::cpu::rnn_sequence(CellKind::Lstm, &CpuTensor::new(xg, &[rows, gh]), &f(&hw_hh, &[gh, hidden]), &f(&hb_hh, &[gh]), &zeros, Some(&zeros), None, false);
            want = out.to_f32();
        });
        // Forward: input projection 2 rows in 4H + recurrent 2 rows H 4H; backward twice that.
        let fwd_flops = 2.0 * (rows * hidden * gh) as f64 * 2.0;
        let r = Tensor::rand_uniform(&[steps, n, hidden], -1.0, 1.0, &mut rng)?;
        let weights = [kiln_nn::RnnWeights { w_ih: w_ih.clone(), w_hh: w_hh.clone(), b_ih: b_ih.clone(), b_hh: b_hh.clone() }];
        for fused in [true, false] {
            let variant = if fused { "fused cells" } else { "composed ops" };
            let rec = ctx.base("recurrent", &format!("LSTM layer n {n}, {steps} steps, hidden {hidden}: fwd+bwd"), &[n, steps, hidden], variant);
            kiln_nn::set_fusion(gpu()?, fused);
            let res = ctx.measure(rec, 3.0 * fwd_flops, false, &want, 1e-3, Some(cpu_ms * 3.0), || {
                let (out, _) = kiln_nn::rnn_forward(CellKind::Lstm, &x, None, &weights, 1, &|t| Ok(t.clone()))?;
                out.mul(&r)?.sum_all()?.backward()?;
                Ok(out.detach())
            });
            kiln_nn::set_fusion(gpu()?, true);
            res?;
        }
    }
    Ok(())
}

// ---- attention ------------------------------------------------------------------------------------------

/// Scaled dot-product attention forward and backward (batch x heads rows, head size 64), causal and not: the
/// fused flash-style kernels against the composed ops (matmul, softmax, matmul, storing the [T, T] scores),
/// time and the peak memory the pass allocates. Outputs are checked against the f64 reference on the first
/// rows first (the whole reference is O(T^2 d) per row). The composed form is skipped where its scores alone
/// would pass half the adapter's largest buffer.
fn attention_family(ctx: &mut Ctx) -> R<()> {
    use kiln_graph::attention::{attention_composed, attention_fused};
    let g = gpu()?;
    let d = 64;
    let mut rng = Rng::new(31);
    for (bh, t) in ctx.opts.attention.clone() {
        let ((q, hq), (k, hk), (v, hv)) = (randn(&[bh, t, d], &mut rng)?, randn(&[bh, t, d], &mut rng)?, randn(&[bh, t, d], &mut rng)?);
        let (q, k, v) = (q.var(), k.var(), v.var());
        let r = Tensor::randn(&[bh, t, d], 1.0, &mut rng)?;
        for causal in [false, true] {
            // The reference on batch row 0 only.
            let one = |h: &[f32]| kiln_graph::cpu::CpuTensor::from_f32(&h[..t * d], &[1, t, d]);
            let mut want0 = Vec::new();
            let cpu_ms = cpu_time(1, || want0 = kiln_graph::cpu::attention(&one(&hq), &one(&hk), &one(&hv), None, causal, 1.0 / (d as f64).sqrt(), None).to_f32());
            let pairs = if causal { (t * (t + 1) / 2) as f64 } else { (t * t) as f64 };
            // Forward 2 products of pairs x d, backward 4 (the fused one recomputes the scores: 5).
            let flops = bh as f64 * pairs * d as f64 * 2.0 * 6.0;
            for fused in [true, false] {
                let variant = if fused { "fused (flash)" } else { "composed" };
                let mut rec = ctx.base("attention", &format!("attention bh {bh}, T {t}, d {d}{}: fwd+bwd", if causal { ", causal" } else { "" }), &[bh, t, d], variant);
                let score_bytes = 4 * bh * t * t;
                if !fused && score_bytes as u64 > g.limits.max_buffer_size / 2 {
                    rec.valid = true;
                    rec.note = Some(format!("not run: the composed form stores {:.1} GiB of scores", score_bytes as f64 / (1u64 << 30) as f64));
                    ctx.push(rec);
                    continue;
                }
                let f = if fused { attention_fused } else { attention_composed };
                let run = || -> R<Tensor> {
                    let o = f(&q, &k, &v, None, causal, None, None)?;
                    o.mul(&r)?.sum_all()?.backward()?;
                    Ok(o.detach())
                };
                // Validate row 0 and measure the pass's peak memory once.
                g.sync()?;
                g.reset_peak();
                let before = g.stats().live_bytes;
                let got = run()?.to_vec()?;
                let peak = g.stats().peak_live_bytes.saturating_sub(before);
                let scale = want0.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let bad = got[..t * d].iter().zip(&want0).any(|(a, b)| (a - b).is_nan() || (a - b).abs() > 1e-3 * scale);
                rec.step_peak_bytes = Some(peak);
                if bad {
                    rec.valid = false;
                    rec.note = Some("wrong against the f64 reference; not timed".into());
                    ctx.push(rec);
                    continue;
                }
                rec.valid = true;
                let t0 = Instant::now();
                run()?;
                g.sync()?;
                let one_s = t0.elapsed().as_secs_f64();
                let runs = ctx.opts.runs.max(10);
                if one_s * runs as f64 > ctx.opts.budget_s {
                    rec.median_ms = Some(one_s * 1e3);
                    rec.note = Some(format!("one run timed ({one_s:.2} s): {runs} runs exceed the budget; peak {:.1} MiB", peak as f64 / (1 << 20) as f64));
                } else {
                    let (ms, timing) = time_ms_with(g, 1, runs, || run().map(drop))?;
                    rec.median_ms = Some(ms);
                    rec.timing = Some(timing);
                    rec.note = Some(format!("peak {:.1} MiB allocated by the pass", peak as f64 / (1 << 20) as f64));
                }
                let ms = rec.median_ms.unwrap_or(f64::NAN);
                rec.gflops = Some(flops / ms / 1e6);
                rec.roof_fraction = Some(flops / ms / 1e6 / ctx.roofs.fma_gflops);
                // The reference's forward on one row, scaled to the pass's FLOPs: a rate, per FLOP.
                rec.cpu_gflops = Some(pairs * d as f64 * 4.0 / cpu_ms / 1e6);
                ctx.push(rec);
            }
        }
    }
    Ok(())
}

// ---- whole training steps ------------------------------------------------------------------------------

/// A family of benchmarks: its name and the function that runs it.
type Family = (&'static str, fn(&mut Ctx) -> R<()>);

fn step_family(ctx: &mut Ctx) -> R<()> {
    for model in ctx.opts.models.clone() {
        let (input, classes) = model_input(&model);
        let flops: f64 = step_matmul_shapes(&model, ctx.opts.batch)?.iter().map(|s| s.flops()).sum();
        // Each step with and without the bias + activation fusion, to show what it pays.
        for fused in [true, false] {
            kiln_nn::set_fusion(gpu()?, fused);
            let b = crate::step::bench_step(&model, input, classes, ctx.opts.batch, ctx.opts.runs.max(10));
            kiln_nn::set_fusion(gpu()?, true);
            let b = b?;
            let variant = if fused { "fused bias+activation" } else { "unfused" };
            let mut rec = ctx.base("step", &format!("{model} step (fwd, bwd, Adam)"), &[ctx.opts.batch, input[0], input[1], input[2]], variant);
            rec.valid = true;
            rec.median_ms = Some(b.ms_per_step);
            rec.timing = Some(Timing::WallFence);
            rec.gflops = Some(flops / b.ms_per_step / 1e6);
            rec.roof_fraction = Some(flops / b.ms_per_step / 1e6 / ctx.roofs.fma_gflops);
            rec.model = Some(model.clone());
            rec.batch = Some(b.batch);
            rec.ms_per_step = Some(b.ms_per_step);
            rec.host_ms_per_step = Some(b.host_ms_per_step);
            rec.bind_groups_per_step = Some(b.bind_groups_per_step);
            rec.samples_per_s = Some(b.samples_per_s);
            rec.submits_per_step = Some(b.submits_per_step);
            rec.bytes_allocated_after_first_step = Some(b.bytes_created_after_first_step);
            rec.peak_gpu_bytes = Some(b.peak_gpu_bytes);
            rec.step_peak_bytes = Some(b.step_peak_bytes);
            rec.bytes_handed_out_per_step = Some(b.bytes_handed_out_per_step);
            ctx.push(rec);
            if !b.kernels.is_empty() {
                println!("    where its GPU time goes (KILN_PROFILE; each dispatch timed alone): {:.3} ms/step in all", b.kernels.iter().map(|k| k.ms_per_step).sum::<f64>());
                for k in b.kernels.iter().take(12) {
                    println!("    {:<64} {:>6.1} dispatches {:>9.3} ms", k.kernel, k.dispatches_per_step, k.ms_per_step);
                }
            }
        }
    }
    Ok(())
}

// ---- language-model training steps -------------------------------------------------------------------

/// The two character language models at their default sizes (`kiln train char-rnn`: a 2 x 256 LSTM;
/// `char-transformer`: d_model 128, 2 blocks, 4 heads), one training step each (forward, backward, Adam, the
/// loss read back) on random windows of 64 characters over an 83-character vocabulary like Moby-Dick's:
/// ms per step, tokens per second, and the GFLOP/s of the step's matmul work (forward, and twice it backward).
fn lm_family(ctx: &mut Ctx) -> R<()> {
    use kiln_models::lm::{char_transformer_defaults, CharLmConfig, LmShape, TextModel};
    let vocab = kiln_data::CharVocab::from_text(&(0u8..83).map(|i| char::from(b'!' + i)).collect::<String>());
    let v = vocab.len() as f64;
    for cfg in [CharLmConfig::default(), char_transformer_defaults()] {
        let (n, t) = (ctx.opts.lm_batch, cfg.window);
        let g = gpu()?;
        g.sync()?;
        g.reset_peak();
        let mut vs = kiln_nn::VarStore::new(1);
        let model = TextModel::new(&mut vs, vocab.clone(), cfg.shape)?;
        vs.finish()?;
        let steps = ctx.opts.runs.max(3);
        let mut opt = kiln_nn::Optimizer::new(&vs, kiln_nn::OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 1e-3, 0.0, kiln_nn::schedule::Schedule::constant(), steps as u64 + 2)?;
        let mut rng = Rng::new(5);
        let ids: Vec<u32> = (0..n * (t + 1)).map(|_| 4 + rng.below(83) as u32).collect();
        let tokens: Vec<u32> = (0..n).flat_map(|i| ids[i * (t + 1)..i * (t + 1) + t].to_vec()).collect();
        let targets: Vec<u32> = (0..n).flat_map(|i| ids[i * (t + 1) + 1..(i + 1) * (t + 1)].to_vec()).collect();
        let (x, y) = (Tensor::from_u32(&tokens, &[n, t])?, Tensor::from_u32(&targets, &[n * t])?);
        let mut step = || -> R<f64> {
            let start = std::time::Instant::now();
            let l = kiln_graph::loss::cross_entropy(&model.as_window_model().logits(&x)?, &y)?;
            opt.step(&vs, &l.backward()?)?;
            l.to_scalar()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        step()?;
        step()?;
        let mut times = (0..steps).map(|_| step()).collect::<R<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        // Matmul work per token, forward; a step is three times it (the backward's two products per matmul).
        let (name, per_token) = match cfg.shape {
            LmShape::Recurrent(r) => {
                let h = r.hidden as f64;
                let layers: f64 = (0..r.layers).map(|l| 2.0 * (if l == 0 { r.dim as f64 } else { h } + h) * 4.0 * h).sum();
                (format!("char-rnn step ({} x {} {:?}; fwd, bwd, Adam)", r.layers, r.hidden, r.cell), layers + 2.0 * h * v)
            }
            LmShape::Transformer(s) => {
                let (d, ff) = (s.d_model as f64, s.feedforward as f64);
                // q, k, v and out projections, the feed-forward pair, and the scores and weighted sum (causal: half).
                let block = 2.0 * 4.0 * d * d + 2.0 * 2.0 * d * ff + 2.0 * d * t as f64;
                (format!("char-transformer step (d {}, {} blocks; fwd, bwd, Adam)", s.d_model, s.layers), s.layers as f64 * block + 2.0 * d * v)
            }
        };
        let flops = 3.0 * per_token * (n * t) as f64;
        let mut rec = ctx.base("lm", &name, &[n, t], "default size");
        rec.valid = true;
        rec.median_ms = Some(ms);
        rec.ms_per_step = Some(ms);
        rec.timing = Some(Timing::WallFence);
        rec.batch = Some(n);
        rec.samples_per_s = Some(n as f64 * 1e3 / ms);
        rec.tokens_per_s = Some((n * t) as f64 * 1e3 / ms);
        rec.gflops = Some(flops / ms / 1e6);
        rec.roof_fraction = Some(flops / ms / 1e6 / ctx.roofs.fma_gflops);
        rec.peak_gpu_bytes = Some(g.stats().peak_live_bytes);
        rec.model = Some(cfg.shape.model_name().into());
        ctx.push(rec);
    }
    Ok(())
}

// ---- detection ops -------------------------------------------------------------------------------------

/// NMS (torchvision's semantics, IoU 0.5) on n random boxes of 3-30 pixels with whole-pixel corners, about 20
/// per 30 x 30 area, the kept list checked against the f64 reference and timed beside it;
/// RoI-Align forward + backward (7 x 7 bins, 2 x 2 samples, aligned) checked against the reference's forward;
/// transposed convolutions beside their adjoint convolutions; a training step of each detector and segmenter.
fn detection_family(ctx: &mut Ctx) -> R<()> {
    use kiln_graph::vision::{nms_fixed, NmsOptions, RoiAlignGeom};
    let mut rng = Rng::new(31);
    for n in ctx.opts.nms.clone() {
        let mut rec = ctx.base("detection", &format!("nms {n} boxes (IoU 0.5)"), &[n, 4], "bitmask blocks");
        let side = ((n as f64 / 20.0).sqrt() * 30.0).max(60.0) as usize;
        let boxes: Vec<[f32; 4]> = (0..n)
            .map(|_| {
                let (x, y) = (rng.below(side) as f32, rng.below(side) as f32);
                [x, y, x + 3.0 + rng.below(28) as f32, y + 3.0 + rng.below(28) as f32]
            })
            .collect();
        let scores: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
        let b64: Vec<[f64; 4]> = boxes.iter().map(|b| b.map(|v| v as f64)).collect();
        let s64: Vec<f64> = scores.iter().map(|&v| v as f64).collect();
        let mut want = Vec::new();
        let cpu_ms = cpu_time(1, || want = kiln_graph::cpu::nms(&b64, &s64, None, 0.5, f64::NEG_INFINITY, n, false));
        let (bt, st) = (Tensor::from_slice(&boxes.concat(), &[n, 4])?, Tensor::from_slice(&scores, &[n])?);
        let run = || -> R<(Tensor, Tensor)> { nms_fixed(&bt, &st, None, NmsOptions::torchvision(0.5)) };
        let (keep, count) = run()?;
        let count = count.to_vec_u32()?[0] as usize;
        let got = keep.to_vec_u32()?[..count].to_vec();
        rec.valid = got == want;
        if !rec.valid {
            rec.note = Some(format!("wrong: {} boxes kept, the reference keeps {}; not timed", got.len(), want.len()));
            ctx.push(rec);
            continue;
        }
        let mut times = Vec::new();
        for _ in 0..ctx.opts.runs.max(3) {
            let t = Instant::now();
            run()?.1.to_vec_u32()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            if times.iter().sum::<f64>() > 1e3 * ctx.opts.budget_s {
                break;
            }
        }
        times.sort_by(f64::total_cmp);
        rec.median_ms = Some(times[times.len() / 2]);
        rec.timing = Some(Timing::WallFence);
        rec.note = Some(format!("{count} kept; the CPU reference (f64, one thread) takes {cpu_ms:.2} ms"));
        ctx.push(rec);
    }
    for (k, c, side) in ctx.opts.roi_align.clone() {
        let geom = RoiAlignGeom::new([7, 7], 0.25, 2, true);
        let x = Tensor::rand_uniform(&[2, c, side, side], -1.0, 1.0, &mut rng)?.var();
        let image = 4.0 * side as f64;
        let rois: Vec<f32> = (0..k)
            .flat_map(|_| {
                let (x1, y1) = (rng.range(0.0, 0.8 * image), rng.range(0.0, 0.8 * image));
                [rng.below(2) as f64, x1, y1, x1 + rng.range(16.0, 0.5 * image), y1 + rng.range(16.0, 0.5 * image)].map(|v| v as f32)
            })
            .collect();
        let rt = Tensor::from_slice(&rois, &[k, 5])?;
        let hx = x.to_vec()?;
        let mut want = Vec::new();
        let cpu_ms = cpu_time(1, || {
            let xc = kiln_graph::cpu::CpuTensor::from_f32(&hx, &[2, c, side, side]);
            want = kiln_graph::cpu::roi_align(&xc, &rois.iter().map(|&v| v as f64).collect::<Vec<_>>(), &geom).to_f32();
        });
        let r = Tensor::rand_uniform(&[k, c, 7, 7], -1.0, 1.0, &mut rng)?;
        // 4 samples a bin, each 4 reads, 4 multiplies and 4 adds; the backward about the same again, twice.
        let fwd_flops = (k * c * 49 * 4 * 12) as f64;
        let rec = ctx.base("detection", &format!("roi_align {k} RoIs, [2, {c}, {side}, {side}] -> 7x7: fwd+bwd"), &[k, c, side, side], "gather backward");
        ctx.measure(rec, 3.0 * fwd_flops, false, &want, 1e-4, Some(cpu_ms * 3.0), || {
            let y = x.roi_align(&rt, geom)?;
            y.mul(&r)?.sum_all()?.backward()?;
            Ok(y.detach())
        })?;
    }
    // Transposed convolutions beside the convolutions they are the adjoints of (the same products, the same
    // FLOPs): U-Net's 2x2 stride-2 up-convolution and the 4x4 stride-2 one of DCGAN-style decoders.
    for (k, pad) in [(2usize, 0usize), (4, 1)] {
        let geom = kiln_graph::Conv2dGeom { stride: [2, 2], padding: [pad, pad], ..Default::default() };
        let (n, c_small, c_big, side) = (16usize, 64usize, 32usize, 16usize);
        let small = Tensor::rand_uniform(&[n, c_small, side, side], -1.0, 1.0, &mut rng)?.var();
        let big = Tensor::rand_uniform(&[n, c_big, 2 * side, 2 * side], -1.0, 1.0, &mut rng)?.var();
        // One weight [64, 32, k, k]: conv2d reads it as [out 64, in 32], conv_transpose2d as [in 64, out 32].
        let w = Tensor::rand_uniform(&[c_small, c_big, k, k], -0.1, 0.1, &mut rng)?.var();
        let (hs, hb, hw) = (small.to_vec()?, big.to_vec()?, w.to_vec()?);
        let flops = 3.0 * 2.0 * (n * c_small * side * side * c_big * k * k) as f64;
        let shape = [n, c_small, side, side, c_big, k];
        let cw = kiln_graph::cpu::CpuTensor::from_f32(&hw, &[c_small, c_big, k, k]);
        let mut want = Vec::new();
        let cpu_ms = cpu_time(1, || want = kiln_graph::cpu::CpuTensor::from_f32(&hs, &[n, c_small, side, side]).conv_transpose2d(&cw, &geom, [0, 0]).to_f32());
        let r = Tensor::rand_uniform(&[n, c_big, 2 * side, 2 * side], -1.0, 1.0, &mut rng)?;
        let name = format!("conv_transpose2d {k}x{k} s2 [{n}, {c_small}, {side}, {side}] -> [{n}, {c_big}, {}, {}]: fwd+bwd", 2 * side, 2 * side);
        let rec = ctx.base("detection", &name, &shape, "conv input gradient");
        ctx.measure(rec, flops, false, &want, 1e-4, Some(cpu_ms * 3.0), || {
            let y = small.conv_transpose2d(&w, geom, [0, 0])?;
            y.mul(&r)?.sum_all()?.backward()?;
            Ok(y.detach())
        })?;
        let cpu_ms = cpu_time(1, || want = kiln_graph::cpu::CpuTensor::from_f32(&hb, &[n, c_big, 2 * side, 2 * side]).conv2d(&cw, &geom).to_f32());
        let r = Tensor::rand_uniform(&[n, c_small, side, side], -1.0, 1.0, &mut rng)?;
        let name = format!("conv2d {k}x{k} s2 [{n}, {c_big}, {}, {}] -> [{n}, {c_small}, {side}, {side}] (its adjoint): fwd+bwd", 2 * side, 2 * side);
        let rec = ctx.base("detection", &name, &shape, "conv");
        ctx.measure(rec, flops, false, &want, 1e-4, Some(cpu_ms * 3.0), || {
            let y = big.conv2d(&w, geom)?;
            y.mul(&r)?.sum_all()?.backward()?;
            Ok(y.detach())
        })?;
    }
    for side in ctx.opts.scene_sides.clone() {
        detector_steps(ctx, side, &mut rng)?;
    }
    Ok(())
}

/// One training step (forward, backward, Adam) at batch `scene_batch` (16) of each detector and segmenter on
/// object scenes of `side` pixels: at 64 the examples' scenes (1-3 digits), at any other side the data set's defaults (2-6
/// objects, digits and Fashion-MNIST, 20 classes), with the `kiln train` settings for each model.
fn detector_steps(ctx: &mut Ctx, side: usize, rng: &mut Rng) -> R<()> {
    use kiln_data::{ObjectSceneConfig, ObjectScenes, ObjectSource, ObjectSplit};
    let batch_size = ctx.opts.scene_batch;
    let scenes = if side == 64 {
        ObjectSceneConfig { size: 64, objects: (1, 3), scale: (0.7, 1.4), source: ObjectSource::Digits, ..Default::default() }
    } else {
        ObjectSceneConfig { size: side, ..Default::default() }
    };
    let data_err = |e: kiln_data::DataError| KilnError::Data(e.to_string());
    let set = ObjectScenes::new(scenes, ObjectSplit::Train, 1, batch_size, None).map_err(data_err)?;
    let classes = set.classes();
    let (px, batch) = set.batch(0, batch_size).map_err(data_err)?;
    let x = Tensor::from_slice(&px, &[batch_size, 3, side, side])?;
    let what = if side == 64 { "1-3 digits".to_string() } else { format!("2-6 objects, {classes} classes") };
    let shape = [batch_size, 3, side, side];
    // The two-stage detector: RPN, RoI-Align box and mask heads, both samplers.
    {
        use kiln_models::rcnn::{scene_targets, TwoStage, TwoStageConfig};
        let targets: Vec<_> = batch.iter().map(scene_targets).collect();
        let anchors = if side == 64 { vec![12.0, 20.0, 32.0] } else { [12.0, 24.0, 48.0].map(|a| a * side as f32 / 128.0).to_vec() };
        let mut vs = kiln_nn::VarStore::new(1);
        let model = TwoStage::new(&mut vs, TwoStageConfig { classes, anchor_sizes: anchors, representation: 128, ..Default::default() })?;
        vs.finish()?;
        let mut opt = adam(&vs)?;
        let ms = median_step(ctx, || {
            let l = model.losses(&x, &targets, rng)?.total()?;
            opt.step(&vs, &l.backward()?)?;
            l.to_scalar()?;
            Ok(())
        })?;
        push_step(ctx, "detection", &format!("two-stage detector step, {side} x {side} scenes of {what} (RPN, box and mask heads)"), &shape, batch_size, ms, vs.num_values());
    }
    // YOLO, both layouts (3 anchors from k-means on the batch's boxes; YOLOv1's 2 boxes a cell), with batch norm.
    {
        use kiln_models::yolo::{encode_anchors, encode_v1, grid_for, kmeans_anchors, Yolo, YoloLayout};
        let sizes: Vec<(f32, f32)> = batch.iter().flat_map(|sc| sc.objects.iter().map(|o| (o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]))).collect();
        let anchors = kmeans_anchors(&sizes, 3, 1).0;
        let s = grid_for(side);
        for layout in [YoloLayout::Anchors(anchors.clone()), YoloLayout::V1 { boxes: 2 }] {
            let mut vs = kiln_nn::VarStore::new(1);
            let model = Yolo::with_batch_norm(&mut vs, layout.clone(), classes, 16, true)?;
            vs.finish()?;
            let mut opt = adam(&vs)?;
            let objects = |sc: &kiln_data::ObjectScene| (sc.objects.iter().map(|o| o.bbox).collect::<Vec<_>>(), sc.objects.iter().map(|o| o.class).collect::<Vec<_>>());
            let anchor_targets: Vec<_> = batch.iter().map(objects).map(|(b, l)| encode_anchors(&b, &l, (side, side), s, &anchors)).collect();
            let v1_targets: Vec<_> = batch.iter().map(objects).map(|(b, l)| encode_v1(&b, &l, (side, side), s, classes)).collect();
            let ms = median_step(ctx, || {
                let pred = model.forward(&x)?;
                let l = match layout {
                    YoloLayout::Anchors(_) => model.loss(&pred, &anchor_targets, 5.0, 0.5)?,
                    YoloLayout::V1 { .. } => model.loss_v1(&pred, &v1_targets, 5.0, 0.5)?,
                };
                opt.step(&vs, &l.backward()?)?;
                l.to_scalar()?;
                Ok(())
            })?;
            push_step(ctx, "detection", &format!("YOLO step ({}), {side} x {side} scenes of {what}", layout.name()), &shape, batch_size, ms, vs.num_values());
        }
    }
    // The three segmenters (width 16, depth 3, batch norm, median-frequency-weighted cross-entropy).
    {
        use kiln_models::segment::{median_frequency_weights, Decoder, SegmentNet};
        let labels: Vec<u32> = batch.iter().flat_map(|sc| sc.semantic.iter().copied()).collect();
        let y = Tensor::from_u32(&labels, &[batch_size, side, side])?;
        let weights = median_frequency_weights(batch.iter().map(|sc| sc.semantic.as_slice()), classes + 1);
        let weights = Tensor::from_slice(&weights, &[classes + 1])?;
        for decoder in [Decoder::Fcn, Decoder::SegNet, Decoder::UNet] {
            let mut vs = kiln_nn::VarStore::new(1);
            let net = SegmentNet::new(&mut vs, decoder, classes + 1, 16, 3, true)?;
            vs.finish()?;
            let mut opt = adam(&vs)?;
            let ms = median_step(ctx, || {
                let l = kiln_graph::loss::pixel_cross_entropy(&net.forward(&x)?, &y, Some(&weights), Default::default())?;
                opt.step(&vs, &l.backward()?)?;
                l.to_scalar()?;
                Ok(())
            })?;
            push_step(ctx, "detection", &format!("{} segmentation step, {side} x {side} scenes of {what}", decoder.name()), &shape, batch_size, ms, vs.num_values());
        }
    }
    Ok(())
}

// ---- generative models -------------------------------------------------------------------------------

fn adam(vs: &kiln_nn::VarStore) -> R<kiln_nn::Optimizer> {
    kiln_nn::Optimizer::new(vs, kiln_nn::OptimizerKind::Adam { beta1: 0.5, beta2: 0.999, eps: 1e-8 }, 1e-4, 0.0, kiln_nn::schedule::Schedule::constant(), 1_000_000)
}

/// The median wall time of `step` (which waits for its result) over the suite's runs, after two warm-ups.
fn median_step(ctx: &Ctx, mut step: impl FnMut() -> R<()>) -> R<f64> {
    step()?;
    step()?;
    let mut times = Vec::new();
    for _ in 0..ctx.opts.runs.max(3) {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if times.iter().sum::<f64>() > 1e3 * ctx.opts.budget_s {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn push_step(ctx: &mut Ctx, family: &str, name: &str, shape: &[usize], batch: usize, ms: f64, parameters: usize) {
    let mut rec = ctx.base(family, name, shape, "training step");
    rec.valid = true;
    rec.median_ms = Some(ms);
    rec.ms_per_step = Some(ms);
    rec.timing = Some(Timing::WallFence);
    rec.batch = Some(batch);
    rec.samples_per_s = Some(batch as f64 * 1e3 / ms);
    rec.peak_gpu_bytes = gpu().ok().map(|g| g.stats().peak_live_bytes);
    rec.note = Some(format!("{parameters} parameters; the model's own tests check its values"));
    ctx.push(rec);
}

/// What issue 14 times: transposed convolution forward + backward (DCGAN's generator layer, checked against
/// the f64 reference), a DCGAN step (discriminator and generator, batch 64), a VAE step (batch 64), and one
/// style-transfer iteration (a random VGG-19 at a quarter of its channels, `style_side` pixels square).
fn generative_family(ctx: &mut Ctx) -> R<()> {
    let mut rng = Rng::new(41);
    let geom = kiln_graph::Conv2dGeom { stride: [2, 2], padding: [1, 1], ..Default::default() };
    let x = Tensor::rand_uniform(&[64, 64, 7, 7], -1.0, 1.0, &mut rng)?.var();
    let w = Tensor::rand_uniform(&[64, 32, 4, 4], -0.1, 0.1, &mut rng)?.var();
    let (hx, hw) = (x.to_vec()?, w.to_vec()?);
    let mut want = Vec::new();
    let cpu_ms = cpu_time(1, || {
        let xc = kiln_graph::cpu::CpuTensor::from_f32(&hx, &[64, 64, 7, 7]);
        want = xc.conv_transpose2d(&kiln_graph::cpu::CpuTensor::from_f32(&hw, &[64, 32, 4, 4]), &geom, [0, 0]).to_f32();
    });
    let r = Tensor::rand_uniform(&[64, 32, 14, 14], -1.0, 1.0, &mut rng)?;
    // Forward: every input pixel meets 32 x 16 weights; backward twice that.
    let flops = 3.0 * 2.0 * (64 * 64 * 49 * 32 * 16) as f64;
    let rec = ctx.base("generative", "conv_transpose2d 4x4 s2 [64, 64, 7, 7] -> [64, 32, 14, 14]: fwd+bwd", &[64, 64, 7, 7], "conv input gradient");
    ctx.measure(rec, flops, false, &want, 1e-4, Some(cpu_ms * 3.0), || {
        let y = x.conv_transpose2d(&w, geom, [0, 0])?;
        y.mul(&r)?.sum_all()?.backward()?;
        Ok(y.detach())
    })?;

    {
        use kiln_models::gan::{discriminator_loss, generator_loss, Discriminator, Generator, GeneratorLoss};
        let (mut gvs, mut dvs) = (kiln_nn::VarStore::new(1), kiln_nn::VarStore::new(2));
        let generator = Generator::new(&mut gvs, 64, 32)?;
        gvs.finish()?;
        let discriminator = Discriminator::new(&mut dvs, 32, true)?;
        dvs.finish()?;
        let (mut gopt, mut dopt) = (adam(&gvs)?, adam(&dvs)?);
        let real = Tensor::rand_uniform(&[64, 1, 28, 28], -1.0, 1.0, &mut rng)?;
        let z = Tensor::randn(&[64, 64], 1.0, &mut rng)?;
        let ms = median_step(ctx, || {
            let fake = generator.forward(&z)?;
            let d = discriminator_loss(&discriminator.forward(&real)?, &discriminator.forward(&fake.detach())?)?;
            dopt.step(&dvs, &d.backward()?)?;
            let g = generator_loss(&discriminator.forward(&fake)?, GeneratorLoss::NonSaturating)?;
            gopt.step(&gvs, &g.backward()?)?;
            g.to_scalar()?;
            Ok(())
        })?;
        push_step(ctx, "generative", "DCGAN step (D then G; latent 64, width 32, Fashion-MNIST size)", &[64, 1, 28, 28], 64, ms, gvs.num_values() + dvs.num_values());
    }
    {
        use kiln_models::vae::{Likelihood, Vae};
        let mut vs = kiln_nn::VarStore::new(3);
        let vae = Vae::new(&mut vs, 20, 400, Likelihood::Bernoulli)?;
        vs.finish()?;
        let mut opt = adam(&vs)?;
        let x = Tensor::from_slice(&(0..64 * 784).map(|_| rng.below(2) as f32).collect::<Vec<_>>(), &[64, 784])?;
        let eps = Tensor::randn(&[64, 20], 1.0, &mut rng)?;
        let ms = median_step(ctx, || {
            let l = vae.loss(&x, &eps, 1.0)?;
            opt.step(&vs, &l.backward()?)?;
            l.to_scalar()?;
            Ok(())
        })?;
        push_step(ctx, "generative", "VAE step (784-400-20, Bernoulli; fwd, bwd, Adam)", &[64, 784], 64, ms, vs.num_values());
    }
    {
        use kiln_models::style::{gram_matrix, style_layer_loss, VggFeatures};
        let side = ctx.opts.style_side;
        let net = VggFeatures::random(4, 1)?;
        let layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"];
        let style = Tensor::rand_uniform(&[1, 3, side, side], 0.0, 1.0, &mut rng)?;
        let targets = kiln_graph::no_grad(|| -> R<Vec<Tensor>> {
            let f = net.features(&style, &layers)?;
            layers.iter().map(|l| gram_matrix(&f[*l])).collect::<Result<Vec<_>, _>>()
        })?;
        let image = Tensor::rand_uniform(&[1, 3, side, side], 0.0, 1.0, &mut rng)?.var();
        let ms = median_step(ctx, || {
            let f = net.features(&image, &layers)?;
            let mut loss = style_layer_loss(&f[layers[0]], &targets[0])?;
            for (l, t) in layers.iter().zip(&targets).skip(1) {
                loss = loss.add(&style_layer_loss(&f[*l], t)?)?;
            }
            let g = loss.backward()?;
            g.get(&image).map(|t| t.to_vec()).transpose()?;
            Ok(())
        })?;
        push_step(ctx, "generative", &format!("style-transfer iteration at {side} x {side} (VGG-19 / 4, random; fwd, bwd)"), &[1, 3, side, side], 1, ms, net.parameters());
    }
    Ok(())
}

// ---- data parallelism ------------------------------------------------------------------------------------

/// The all-reduce of data-parallel training (`kiln_nn::parallel::all_reduce`: host-staged, 4 MiB buckets) over
/// N logical devices on the adapter, against the message size: device i holds i + 1 everywhere, so the mean
/// is checked exactly, then timed (median). The rate is the bus bandwidth as NCCL's tests define it (the
/// algorithm bandwidth, bytes / time, times 2 (N - 1) / N), so figures compare with a ring all-reduce's.
/// Then a data-parallel training step over two devices per model in `parallel_steps`: its time and the share
/// spent in the all-reduce.
fn allreduce_family(ctx: &mut Ctx) -> R<()> {
    use kiln_graph::backend::{Device, DeviceOptions};
    if let Some(d) = ctx.opts.across.clone() {
        return allreduce_across_ranks(ctx, &*d.0);
    }
    let adapter = gpu()?.info.name.clone();
    let open = |n: usize| -> R<Vec<Device>> { (0..n).map(|_| Ok(Device::open(&DeviceOptions { adapter: Some(adapter.clone()), ..Default::default() })?)).collect() };
    for n in ctx.opts.allreduce_devices.clone() {
        let devices = open(n)?;
        for bytes in ctx.opts.allreduce_bytes.clone() {
            let len = bytes / 4;
            let mut rec = ctx.base("allreduce", &format!("all-reduce over {n} devices (host-staged)"), &[bytes], "4 MiB buckets");
            let buffers = devices.iter().enumerate().map(|(i, d)| Ok(d.upload(bytemuck::cast_slice(&vec![(i + 1) as f32; len]), "all-reduce bench")?)).collect::<R<Vec<_>>>()?;
            let weights = vec![1.0 / n as f64; n];
            let run = || kiln_nn::parallel::all_reduce(&buffers, len, &weights, kiln_nn::parallel::DEFAULT_BUCKET_BYTES);
            let first = run()?;
            let want = (n + 1) as f32 / 2.0;
            let last = &buffers[n - 1];
            let got: Vec<f32> = bytemuck::pod_collect_to_vec(&last.device().read(&last.sub(0, 4 * len as u64))?);
            rec.valid = got.iter().all(|&v| v == want);
            if !rec.valid {
                rec.note = Some(format!("wrong: the mean should be {want} everywhere; not timed"));
                ctx.push(rec);
                continue;
            }
            let runs = ctx.opts.runs.max(10);
            if first.total_ms * runs as f64 > 1e3 * ctx.opts.budget_s {
                rec.note = Some(format!("not timed: one run takes {:.2} s, {runs} runs exceed the budget (raise --budget-s)", first.total_ms / 1e3));
                ctx.push(rec);
                continue;
            }
            // The mean of equal values is the same values: every run sees the same data.
            let times = (0..runs).map(|_| run().map(|t| t.total_ms)).collect::<R<Vec<f64>>>()?;
            ctx.push(all_reduce_record(rec, times, bytes, n, ctx.roofs.copy_gbps, ""));
        }
    }
    for (model, batch) in ctx.opts.parallel_steps.clone() {
        for overlapped in [false, true] {
            let rec = parallel_step(ctx, &open(2)?, &model, batch, overlapped)?;
            ctx.push(rec);
        }
    }
    Ok(())
}

/// One data-parallel training step of a zoo model over `devices` at `batch` images per device (random inputs
/// of the model's own size, cross-entropy, Adam): forward and backward on every device, the gradients'
/// all-reduce, every update, the losses read back. The median of a few steps after a warm-up, with the share
/// the all-reduce took after the backward. `overlapped`: each bucket's copy starts during the backward, as
/// soon as its gradients are final (`kiln_nn::parallel::OverlappedAllReduce`, what `kiln train` does);
/// otherwise the whole all-reduce follows the backward.
fn parallel_step(ctx: &Ctx, devices: &[kiln_graph::backend::Device], model: &str, batch: usize, overlapped: bool) -> R<Record> {
    let input = kiln_models::zoo::ZOO.iter().find(|z| z.0 == model).map(|z| z.1).ok_or_else(|| KilnError::Usage(format!("{model} is not a zoo model")))?;
    let classes = 10;
    let mut replicas = Vec::new();
    let mut rng = Rng::new(8);
    for d in devices {
        replicas.push(d.scope(|| -> R<_> {
            let mut vs = kiln_nn::VarStore::new(1);
            let net = kiln_models::zoo::build_named(&mut vs, model, input, classes, 1)?;
            vs.finish()?;
            let opt = kiln_nn::Optimizer::new(&vs, kiln_nn::OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 1e-4, 0.0, kiln_nn::schedule::Schedule::constant(), 100)?;
            let x: Vec<f32> = (0..batch * input.iter().product::<usize>()).map(|_| rng.normal() as f32).collect();
            let y: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
            Ok((vs, net, opt, Tensor::from_slice(&x, &[batch, input[0], input[1], input[2]])?, Tensor::from_u32(&y, &[batch])?))
        })?);
    }
    let mut step = || -> R<(f64, f64)> {
        let started = Instant::now();
        let mut losses = Vec::new();
        let bucket = kiln_nn::parallel::DEFAULT_BUCKET_BYTES;
        let mut stream = kiln_nn::parallel::OverlappedAllReduce::new(&replicas.iter().map(|r| &r.2).collect::<Vec<_>>(), bucket)?;
        for (i, ((_, net, opt, x, y), d)) in replicas.iter_mut().zip(devices).enumerate() {
            d.scope(|| -> R<()> {
                let loss = kiln_graph::loss::cross_entropy(&kiln_nn::Layer::forward(net, x)?, y)?;
                if overlapped {
                    opt.begin_accumulate()?;
                    loss.backward_with(&mut |leaf, g| {
                        if let Some(slot) = opt.accumulate_param(leaf, g)? {
                            stream.gradient_ready(i, opt, slot, None)?;
                        }
                        Ok(())
                    })?;
                    stream.backward_done(i, opt)?;
                } else {
                    opt.accumulate(&loss.backward()?)?;
                }
                losses.push(loss.read_start()?);
                Ok(())
            })?;
        }
        for d in devices {
            d.sync()?;
        }
        let mut opts: Vec<&mut kiln_nn::Optimizer> = replicas.iter_mut().map(|r| &mut r.2).collect();
        let shares = vec![batch; devices.len()];
        let t = if overlapped { stream.finish(&mut opts, &shares, batch * devices.len(), None)? } else { kiln_nn::parallel::all_reduce_gradients(&mut opts, &shares, bucket)? };
        for ((vs, _, opt, _, _), d) in replicas.iter_mut().zip(devices) {
            d.scope(|| opt.apply(vs))?;
        }
        for l in losses {
            l.wait()?;
        }
        Ok((started.elapsed().as_secs_f64() * 1e3, t.total_ms))
    };
    let warm = step()?;
    let runs = if warm.0 * 3.0 > 1e3 * ctx.opts.budget_s { 1 } else { 3 };
    let mut times = (0..runs).map(|_| step()).collect::<R<Vec<(f64, f64)>>>()?;
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ms, comm) = times[times.len() / 2];
    let bytes = replicas[0].2.gradient_buffer().1 * 4;
    let how = if overlapped { "copies started during the backward" } else { "all-reduce after the backward" };
    let mut rec = ctx.base("allreduce", &format!("{model} data-parallel step (fwd, bwd, all-reduce, Adam)"), &[devices.len(), batch, input[0], input[1], input[2]], &format!("2 devices, {how}"));
    rec.valid = true;
    rec.median_ms = Some(ms);
    rec.ms_per_step = Some(ms);
    rec.timing = Some(Timing::WallFence);
    rec.model = Some(model.into());
    rec.batch = Some(batch * devices.len());
    rec.samples_per_s = Some((batch * devices.len()) as f64 * 1e3 / ms);
    rec.note = Some(format!("all-reduce of {:.1} MiB of gradients: {comm:.1} ms after the backward, {:.1}% of the step", bytes as f64 / (1 << 20) as f64, 100.0 * comm / ms));
    Ok(rec)
}

/// The all-reduce between the ranks of a distributed job (one device each, rank r's buffer holding r + 1):
/// each rank's buffer read back, the sums between ranks (MPI), the result written back. The timing decision
/// and the runs are the same on every rank (a rank that skipped a run would leave the others waiting).
fn allreduce_across_ranks(ctx: &mut Ctx, c: &dyn kiln_nn::parallel::Collective) -> R<()> {
    let (rank, n) = (c.rank(), c.size());
    let g = kiln_graph::backend::Device::current()?;
    for bytes in ctx.opts.allreduce_bytes.clone() {
        let len = bytes / 4;
        let mut rec = ctx.base("allreduce", &format!("all-reduce over {n} MPI ranks (host-staged)"), &[bytes], &c.describe());
        let buffer = g.upload(bytemuck::cast_slice(&vec![(rank + 1) as f32; len]), "all-reduce bench")?;
        let weights = [1.0 / n as f64];
        let run = || kiln_nn::parallel::all_reduce_across(std::slice::from_ref(&buffer), len, &weights, kiln_nn::parallel::DEFAULT_BUCKET_BYTES, Some(c));
        // The first call also waits for the slowest rank to arrive (rank 0 measured the roofs first).
        run()?;
        let first = run()?;
        let want = (n + 1) as f32 / 2.0;
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&g.read(&buffer.sub(0, 4 * len as u64))?);
        // The mean of equal values is the same values: every run sees the same data.
        let mut agree = [f64::from(u8::from(got.iter().all(|&v| v == want))), first.total_ms];
        c.sum_f64(&mut agree)?;
        rec.valid = agree[0] == n as f64;
        if !rec.valid {
            rec.note = Some(format!("wrong: the mean should be {want} everywhere; not timed"));
            ctx.push(rec);
            continue;
        }
        let runs = ctx.opts.runs.max(10);
        // The slowest rank's first run at most the sum of them: every rank makes the same decision from it.
        if agree[1] * runs as f64 > 1e3 * ctx.opts.budget_s {
            rec.note = Some(format!("not timed: one run takes up to {:.2} s, {runs} runs exceed the budget (raise --budget-s)", agree[1] / 1e3));
            ctx.push(rec);
            continue;
        }
        let times = (0..runs).map(|_| run().map(|t| t.total_ms)).collect::<R<Vec<f64>>>()?;
        ctx.push(all_reduce_record(rec, times, bytes, n, ctx.roofs.copy_gbps, &format!("rank {rank}: ")));
    }
    Ok(())
}

/// An all-reduce record from its runs' times (ms): the median, and the bus bandwidth as NCCL's tests define it
/// (bytes / time x 2 (N - 1) / N) beside the copy roof.
fn all_reduce_record(mut rec: Record, mut times: Vec<f64>, bytes: usize, n: usize, copy_roof: f64, who: &str) -> Record {
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    let algbw = bytes as f64 / ms / 1e6;
    let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
    rec.median_ms = Some(ms);
    rec.timing = Some(Timing::WallFence);
    rec.gbps = Some(busbw);
    rec.roof_fraction = Some(busbw / copy_roof);
    rec.note = Some(format!("{who}bus bandwidth {busbw:.2} GB/s (algorithm bandwidth {algbw:.2} GB/s)"));
    rec
}
