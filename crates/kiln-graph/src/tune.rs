//! The autotuner: which matmul kernel runs, per adapter and shape class.
//!
//! On first use of a shape class it checks every candidate kernel against the CPU reference (once per process),
//! times the valid ones on the shape (scaled down to a bounded amount of work), keeps the fastest and writes the
//! choice to `~/.cache/kiln/` (or `$KILN_CACHE_DIR`), in a file keyed by adapter name, driver and Kiln version,
//! so a second run pays nothing. `KILN_AUTOTUNE=off` uses the fixed per-adapter default (what tests run with),
//! `on` (the default) tunes what the cache lacks, `force` re-tunes every class once per process.
//! `KILN_MATMUL=<variant name>` pins one kernel wherever it can run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kiln_wgpu::Gpu;

use crate::error::Result;
use crate::kernels::{self, MatmulVariant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    On,
    Force,
}

impl Mode {
    pub fn from_env() -> Mode {
        match std::env::var("KILN_AUTOTUNE").as_deref() {
            Ok("off") | Ok("0") => Mode::Off,
            Ok("force") => Mode::Force,
            _ => Mode::On,
        }
    }
}

/// Shapes whose best kernel is expected to match: the transposes, whether 16-byte loads apply, and the
/// power-of-two bucket of the batch and of each dimension (capped at 4096).
pub fn shape_class(dev: &Gpu, batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> String {
    let bucket = |x: usize| x.max(1).next_power_of_two().min(4096);
    let vec4 = MatmulVariant::Vec4.supports(dev, m, n, k, trans_a, trans_b).unwrap_or(false);
    format!("{}{} b{} m{} n{} k{}{}", if trans_a { 't' } else { 'n' }, if trans_b { 't' } else { 'n' }, bucket(batch), bucket(m), bucket(n), bucket(k), if vec4 { " v4" } else { "" })
}

/// The kernel used when tuning is off (or for products too small to tune): measured defaults per adapter
/// type. On lavapipe (a CPU adapter) the subgroup kernel is 4-5x the blocked one, with 8 rows per lane for
/// products of at most 8 rows, else 16 (32 rows run ~20% faster on big products but take 2-3 s more to
/// compile cold, so only the tuner picks them); on the H200 the vec4 kernel reached 21 TFLOP/s at 4096³.
pub fn default_variant(dev: &Gpu, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Result<MatmulVariant> {
    let preferred = if is_cpu_adapter(dev) { MatmulVariant::Subgroup(if m <= 8 { 8 } else { 16 }) } else { MatmulVariant::Vec4 };
    Ok(if preferred.supports(dev, m, n, k, trans_a, trans_b)? { preferred } else { MatmulVariant::Blocked })
}

fn is_cpu_adapter(dev: &Gpu) -> bool {
    dev.info.device_type == kiln_wgpu::wgpu::DeviceType::Cpu
}

/// The kernels the tuner times on this adapter. Every shape class pays a pipeline build per candidate on first
/// use (seconds each for the unrolled subgroup kernels on lavapipe), so each adapter type gets the plausible
/// ones: register-blocked and subgroup kernels on CPU adapters (workgroup memory is slow there; a subgroup
/// kernel only with at most twice the rows per lane the product has), and on GPUs every kernel but the wider
/// subgroup ones: the tiled and 8x8 kernels win on large products, while on a training step's small ones
/// (64x128x784) the naive kernel, with the most invocations in flight, was fastest on an H200.
pub fn candidates(dev: &Gpu, m: usize) -> Result<Vec<MatmulVariant>> {
    use MatmulVariant::*;
    Ok(if is_cpu_adapter(dev) {
        let mut c = vec![Blocked];
        c.extend([8u32, 16, 32].into_iter().filter(|&r| r == 8 || m > r as usize / 2).map(Subgroup));
        c
    } else {
        vec![Naive, Blocked, Vec4, Vec4x8, Tiled, Tiled128, Tiled128K16, Subgroup(16)]
    })
}

/// Products under this many FLOPs run the default kernel untuned.
pub const TUNE_MIN_FLOPS: f64 = (1u64 << 22) as f64;

/// A tuning result for one shape class: every candidate's time, and the winner.
#[derive(Clone, Debug)]
pub struct Tuning {
    pub class: String,
    pub timings: Vec<(MatmulVariant, Option<f64>)>,
    pub chosen: MatmulVariant,
}

/// The tuner state: choices by shape class, backed by one cache file.
pub struct Tuner {
    mode: Mode,
    path: Option<PathBuf>,
    choices: HashMap<String, MatmulVariant>,
    /// Classes re-tuned in this process under `force`.
    forced: std::collections::HashSet<String>,
    /// (variant, trans_a, trans_b) checked against the CPU reference in this process.
    validated: HashMap<(MatmulVariant, bool, bool), bool>,
    /// How many classes this tuner timed (0 on a second run with a warm cache).
    pub tuned: usize,
    /// Seconds spent tuning in this process, and the most it may spend (`KILN_AUTOTUNE_BUDGET_S`, default 3):
    /// past it, untuned classes run the default kernel and are tuned by a later run, so a cold start stays
    /// short while the cache fills over a few runs.
    pub spent_s: f64,
    pub budget_s: f64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    kiln_version: String,
    adapter: String,
    driver: String,
    choices: std::collections::BTreeMap<String, String>,
}

/// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(Path::new(&d).join("kiln"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache").join("kiln"))
}

/// The cache file for the current adapter: one per (adapter, driver, Kiln version).
pub fn cache_file(dev: &Gpu, dir: &Path) -> Result<PathBuf> {
    let g = dev;
    let raw = format!("{}-{}-{}-{}", g.info.name, g.info.driver, g.info.driver_info, env!("CARGO_PKG_VERSION"));
    let name: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    Ok(dir.join(format!("autotune-{}.json", &name[..name.len().min(150)])))
}

impl Tuner {
    /// A tuner backed by `dir` (no file when None). Reads the cache unless the mode is `force`; a file that
    /// cannot be read is reported on stderr, named, and replaced on the next save.
    pub fn open(dev: &Gpu, mode: Mode, dir: Option<&Path>) -> Result<Tuner> {
        let path = match dir {
            Some(d) => Some(cache_file(dev, d)?),
            None => None,
        };
        let budget_s = std::env::var("KILN_AUTOTUNE_BUDGET_S").ok().and_then(|v| v.parse().ok()).unwrap_or(3.0);
        let mut t = Tuner { mode, path, choices: HashMap::new(), forced: Default::default(), validated: HashMap::new(), tuned: 0, spent_s: 0.0, budget_s };
        if let Some(p) = t.path.clone() {
            if mode != Mode::Off && p.exists() {
                match t.load(&p) {
                    Ok(()) => {}
                    Err(e) => eprintln!("kiln: ignoring the autotune cache {}: {e}", p.display()),
                }
            }
        }
        Ok(t)
    }

    fn load(&mut self, p: &Path) -> std::result::Result<(), String> {
        let text = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
        let file: CacheFile = serde_json::from_str(&text).map_err(|e| format!("not a Kiln autotune file ({e})"))?;
        for (class, name) in file.choices {
            let v = MatmulVariant::parse(&name).ok_or_else(|| format!("unknown kernel {name:?} for {class:?}"))?;
            self.choices.insert(class, v);
        }
        Ok(())
    }

    /// Writes this tuner's choices over the file's: several devices on one adapter share the file, so what
    /// another tuner wrote since this one loaded is kept, not overwritten. Saves in one process take turns;
    /// two processes saving at the same instant can still lose one's new entries (it is only a cache).
    fn save(&self, dev: &Gpu) -> Result<()> {
        let Some(p) = &self.path else { return Ok(()) };
        static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = SAVING.lock().unwrap_or_else(|e| e.into_inner());
        let g = dev;
        let mut choices: std::collections::BTreeMap<String, String> = std::fs::read_to_string(p).ok().and_then(|t| serde_json::from_str::<CacheFile>(&t).ok()).map(|f| f.choices).unwrap_or_default();
        choices.extend(self.choices.iter().map(|(c, v)| (c.clone(), v.name())));
        let file = CacheFile { kiln_version: env!("CARGO_PKG_VERSION").into(), adapter: g.info.name.clone(), driver: format!("{} {}", g.info.driver, g.info.driver_info), choices };
        let text = serde_json::to_string_pretty(&file).expect("plain data serialises");
        // Written beside and renamed, so a crash never leaves half a file; failure to cache is not fatal.
        let write = || -> std::io::Result<()> {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, p)
        };
        if let Err(e) = write() {
            eprintln!("kiln: could not write the autotune cache {}: {e}", p.display());
        }
        Ok(())
    }

    /// The kernel for this product.
    pub fn choose(&mut self, dev: &Gpu, batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Result<MatmulVariant> {
        if let Some(v) = pinned() {
            if v.supports(dev, m, n, k, trans_a, trans_b)? {
                return Ok(v);
            }
        }
        if self.mode == Mode::Off {
            return default_variant(dev, m, n, k, trans_a, trans_b);
        }
        // Products this small take well under a millisecond whichever kernel runs; tuning them would cost
        // more in pipeline builds (seconds on lavapipe) than it could ever save.
        if 2.0 * (batch * m * n * k) as f64 <= TUNE_MIN_FLOPS {
            return default_variant(dev, m, n, k, trans_a, trans_b);
        }
        let class = shape_class(dev, batch, m, n, k, trans_a, trans_b);
        let stale = self.mode == Mode::Force && !self.forced.contains(&class);
        if let (Some(&v), false) = (self.choices.get(&class), stale) {
            // A class's kernel may need alignment one of its shapes lacks (vec4-8x8 wants k % 4 == 0).
            return if v.supports(dev, m, n, k, trans_a, trans_b)? { Ok(v) } else { default_variant(dev, m, n, k, trans_a, trans_b) };
        }
        if self.spent_s >= self.budget_s {
            return default_variant(dev, m, n, k, trans_a, trans_b);
        }
        let started = Instant::now();
        let t = self.tune(dev, batch, m, n, k, trans_a, trans_b)?;
        self.spent_s += started.elapsed().as_secs_f64();
        self.forced.insert(class.clone());
        self.choices.insert(class, t.chosen);
        self.tuned += 1;
        self.save(dev)?;
        Ok(t.chosen)
    }

    /// Whether `v` computes the right product (checked once per process per variant and transposes, on odd
    /// sizes, against the f64 CPU reference).
    pub fn validate(&mut self, dev: &Gpu, v: MatmulVariant, trans_a: bool, trans_b: bool) -> Result<bool> {
        if let Some(ok) = self.validated.get(&(v, trans_a, trans_b)) {
            return Ok(*ok);
        }
        // Multiples of 4 where 16-byte loads need them, odd otherwise; a batch of 2 with a broadcast operand.
        let (m, n, k) = if matches!(v, MatmulVariant::Vec4 | MatmulVariant::Vec4x8 | MatmulVariant::Tiled128K16) { (36, 44, 28) } else { (37, 45, 29) };
        let ok = check_against_cpu(dev, v, 2, m, n, k, trans_a, trans_b)?;
        self.validated.insert((v, trans_a, trans_b), ok);
        Ok(ok)
    }

    /// Times every valid candidate on this shape, batch included (a GPU's best kernel for one 16x1024x144
    /// product is not its best for 64 of them), and returns them with the fastest. Scaled down, the batch
    /// first, so one run is at most 2^27 FLOPs on a CPU adapter and 2^31 on a GPU.
    pub fn tune(&mut self, dev: &Gpu, batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Result<Tuning> {
        let cap = if is_cpu_adapter(dev) { 1usize << 27 } else { 1 << 31 };
        let (mut tbatch, mut tm, mut tn) = (batch.max(1), m, n);
        while 2 * tbatch * tm * tn * k > cap && tbatch > 1 {
            tbatch = tbatch.div_ceil(2);
        }
        while 2 * tbatch * tm * tn * k > cap && (tm > 64 || tn > 64) {
            if tm >= tn {
                tm = (tm / 2).next_multiple_of(4)
            } else {
                tn = (tn / 2).next_multiple_of(4)
            }
        }
        let tk = k;
        let a = kernels::random_uniform(dev, tbatch * tm * tk, 11, 0)?;
        let b = kernels::random_uniform(dev, tbatch * tk * tn, 12, 0)?;
        let mut timings = Vec::new();
        for v in candidates(dev, m)? {
            if !v.supports(dev, m, n, k, trans_a, trans_b)? || !v.supports(dev, tm, tn, tk, trans_a, trans_b)? || !self.validate(dev, v, trans_a, trans_b)? {
                timings.push((v, None));
                continue;
            }
            let ms = time_ms(dev, 1, 3, || kernels::matmul_with(v, &a, &b, tbatch, tm, tn, tk, tm * tk, tk * tn, trans_a, trans_b).map(drop))?;
            timings.push((v, Some(ms)));
        }
        let chosen = timings.iter().filter_map(|(v, t)| t.map(|t| (*v, t))).min_by(|x, y| x.1.total_cmp(&y.1)).map(|(v, _)| v).unwrap_or(MatmulVariant::Blocked);
        Ok(Tuning { class: shape_class(dev, batch, m, n, k, trans_a, trans_b), timings, chosen })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// How a time was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Timing {
    /// Timestamp queries at the start and end of the kernel's compute pass (GPU time only).
    GpuTimestamps,
    /// Wall time around the submit and a fence (includes the submit and wait overhead).
    WallFence,
}

/// Median time of `runs` calls of `f`, each in a pass and submit of its own, after `warmup` untimed calls:
/// GPU timestamps where the adapter has them, else wall time around a full GPU sync.
pub fn time_ms(dev: &Gpu, warmup: usize, runs: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(time_ms_with(dev, warmup, runs, f)?.0)
}

/// [`time_ms`] and how the times were taken.
pub fn time_ms_with(dev: &Gpu, warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Timing)> {
    let g = dev;
    g.sync()?;
    for _ in 0..warmup {
        f()?;
        g.sync()?;
    }
    let mut t = Vec::with_capacity(runs);
    let mut timing = Timing::GpuTimestamps;
    while t.len() < runs.max(1) {
        if timing == Timing::GpuTimestamps {
            let mut result = Ok(());
            let gpu_ms = g.gpu_time_ms(|| {
                result = f();
                Ok(())
            })?;
            result?;
            match gpu_ms {
                Some(ms) => t.push(ms),
                // No timestamps here (or the work submitted on its own): wall time for every run instead.
                None => {
                    timing = Timing::WallFence;
                    t.clear();
                }
            }
        } else {
            let s = Instant::now();
            f()?;
            g.sync()?;
            t.push(s.elapsed().as_secs_f64() * 1e3);
        }
    }
    t.sort_by(f64::total_cmp);
    Ok((t[t.len() / 2], timing))
}

/// Runs `v` on random [batch, m, k] x [k, n] operands (B broadcast over the batch) and compares with the f64
/// reference: every element within 1e-4 of the largest |C|.
pub fn check_against_cpu(dev: &Gpu, v: MatmulVariant, batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Result<bool> {
    if !v.supports(dev, m, n, k, trans_a, trans_b)? {
        return Ok(false);
    }
    let mut rng = crate::Rng::new(0x5eed ^ (m * 31 + n * 7 + k) as u64);
    let ha: Vec<f32> = (0..batch * m * k).map(|_| rng.normal() as f32).collect();
    let hb: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
    let g = dev;
    let a = g.upload(bytemuck::cast_slice(&ha), "matmul check A")?;
    let b = g.upload(bytemuck::cast_slice(&hb), "matmul check B")?;
    let c = kernels::matmul_with(v, &a, &b, batch, m, n, k, m * k, 0, trans_a, trans_b)?;
    let got: Vec<f32> = bytemuck::cast_slice(&g.read(&c)?).to_vec();
    let want = reference_matmul(&ha, &hb, batch, m, n, k, trans_a, trans_b);
    let scale = want.iter().fold(1e-6f64, |s, x| s.max(x.abs()));
    Ok(got.len() >= want.len() && want.iter().zip(&got).all(|(w, g)| ((*g as f64) - w).abs() <= 1e-4 * scale))
}

/// C[batch, m, n] = op(A[batch]) @ op(B) in f64; A is [m, k] per batch ([k, m] if trans_a), B is [k, n]
/// ([n, k] if trans_b), shared by the batch.
#[allow(clippy::too_many_arguments)]
pub fn reference_matmul(a: &[f32], b: &[f32], batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Vec<f64> {
    let mut c = vec![0f64; batch * m * n];
    for z in 0..batch {
        let ab = &a[z * m * k..(z + 1) * m * k];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if trans_a { ab[p * m + i] } else { ab[i * k + p] };
                    let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[z * m * n + i * n + j] = s;
            }
        }
    }
    c
}

/// KILN_MATMUL (read once per process): the kernel pinned wherever it can run ("scalar", "vec4" and
/// "subgroup" name the blocked, vec4 and subgroup-16x4 kernels).
fn pinned() -> Option<MatmulVariant> {
    static PIN: OnceLock<Option<MatmulVariant>> = OnceLock::new();
    *PIN.get_or_init(|| {
        let name = std::env::var("KILN_MATMUL").ok()?;
        MatmulVariant::parse(&name).or(match name.as_str() {
            "scalar" => Some(MatmulVariant::Blocked),
            "vec4" => Some(MatmulVariant::Vec4),
            "subgroup" => Some(MatmulVariant::Subgroup(16)),
            _ => None,
        })
    })
}

/// KILN_AUTOTUNE, read once per process: the default of every device.
fn process_mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(Mode::from_env)
}

/// This device's tuning mode: its own setting (`set_mode`), else KILN_AUTOTUNE.
pub fn mode(dev: &Gpu) -> Mode {
    match dev.setting("autotune") {
        Some(0) => Mode::Off,
        Some(2) => Mode::Force,
        Some(_) => Mode::On,
        None => process_mode(),
    }
}

/// Sets (Some) or clears (None) this device's tuning mode. Takes effect for a device whose tuner has not
/// opened yet (its first matmul opens it).
pub fn set_mode(dev: &Gpu, mode: Option<Mode>) {
    dev.set_setting(
        "autotune",
        mode.map(|m| match m {
            Mode::Off => 0,
            Mode::On => 1,
            Mode::Force => 2,
        }),
    );
}

/// The device's tuner (mode from [`mode`], cache in `cache_dir()`), opened on first use.
pub fn tuner(dev: &Gpu) -> Result<Arc<Mutex<Tuner>>> {
    if let Some(t) = dev.extension::<Mutex<Tuner>>() {
        return Ok(t);
    }
    let t = Tuner::open(dev, mode(dev), cache_dir().as_deref())?;
    Ok(dev.insert_extension(Mutex::new(t)))
}

/// The kernel `kernels::matmul` runs for this product on `dev`.
pub fn matmul_variant(dev: &Gpu, batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Result<MatmulVariant> {
    // Checked before the tuner's lock: with tuning off, products run without touching it.
    if mode(dev) == Mode::Off && pinned().is_none() {
        return default_variant(dev, m, n, k, trans_a, trans_b);
    }
    let t = tuner(dev)?;
    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
    t.choose(dev, batch, m, n, k, trans_a, trans_b)
}
