//! Data parallelism over several devices of one process (PyTorch's DistributedDataParallel, in one process):
//! a replica of the model on each device with its own optimizer, each batch split between them, and the
//! gradients averaged before every update, so the replicas stay identical.
//!
//! wgpu devices share no memory and have no peer-to-peer copy, so the all-reduce goes through the host. Each
//! replica's flat gradient buffer is read back in buckets (every bucket of every device in flight at once),
//! each bucket is reduced as soon as all its copies have landed (a weighted sum in f64, in replica order), and
//! the one result is written back to every device. Every replica receives the same bits, so deterministic
//! kernels keep their parameters and optimizer states equal bit for bit; [`checksum`] checks it.
//!
//! The weights are the replicas' shares of the batch: with each replica's loss a mean over its own samples,
//! sum_i (n_i / n) g_i is the gradient of the mean over the whole batch, so N devices at batch B train as one
//! device at batch N * B does, up to float summation order (tests/tests/parallel.rs).

use std::time::Instant;

use kiln_graph::backend::{BufView, Device};
use kiln_graph::{KilnError, Result};

use crate::optim::Optimizer;
use crate::varstore::VarStore;

/// Collective operations between the processes of a distributed run (one per rank; MPI's communicator in
/// `kiln-cli`'s `mpi` feature). Kiln's own code needs only these four; every rank must call each one in the same
/// order, as with MPI.
pub trait Collective {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Sums `data` element-wise over the ranks; afterwards every rank holds the same bits.
    fn sum_f64(&self, data: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// What the communicator is, for reports ("MPI, 2 ranks: Open MPI v4.1.4").
    fn describe(&self) -> String;
}

/// A shared handle to a [`Collective`] (what a training configuration holds).
#[derive(Clone)]
pub struct Distributed(pub std::rc::Rc<dyn Collective>);

impl std::fmt::Debug for Distributed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {} ({})", self.0.rank(), self.0.size(), self.0.describe())
    }
}

/// Bytes per all-reduce bucket: each is reduced while later ones are still being copied back.
pub const DEFAULT_BUCKET_BYTES: u64 = 4 << 20;

/// What one all-reduce cost, in wall time on the host.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllReduceTiming {
    /// Bytes of one replica's buffer that were averaged.
    pub bytes: u64,
    pub replicas: usize,
    /// From the call until every result was handed to the devices' queues (the readbacks wait for the work
    /// already submitted that produces the gradients, so call it after that work, or count it in).
    pub total_ms: f64,
    /// Of which: waiting for the copies back to the host.
    pub wait_ms: f64,
    /// Of which: the reduction on the host.
    pub reduce_ms: f64,
    /// Of which: the sums between processes (a distributed run's).
    pub across_ms: f64,
}

/// Averages `len` f32 elements of each buffer (one per replica, each on its own device or not) in place:
/// afterwards every buffer holds sum_i weights[i] * buffers[i], the same bits on every device. A weight of zero
/// leaves that replica's values out (they are not even read). Errors: no buffer, a weight count other than
/// the buffer count, a buffer shorter than `len`, a negative or non-finite weight.
pub fn all_reduce(buffers: &[BufView], len: usize, weights: &[f64], bucket_bytes: u64) -> Result<AllReduceTiming> {
    all_reduce_across(buffers, len, weights, bucket_bytes, None)
}

/// [`all_reduce`], then summed over the ranks of `across` as well, bucket by bucket: every buffer of every rank
/// ends with sum over ranks r of sum_i weights_r[i] * buffers_r[i] (give each replica its share of the whole
/// batch of all ranks). Every rank must call it with the same `len` and `bucket_bytes`; a rank may have no
/// buffer of its own (it still takes part).
pub fn all_reduce_across(buffers: &[BufView], len: usize, weights: &[f64], bucket_bytes: u64, across: Option<&dyn Collective>) -> Result<AllReduceTiming> {
    let started = Instant::now();
    if (buffers.is_empty() && across.is_none()) || weights.len() != buffers.len() {
        return Err(KilnError::Usage(format!("all_reduce: {} buffers and {} weights (one weight per buffer, at least one)", buffers.len(), weights.len())));
    }
    if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        return Err(KilnError::Usage(format!("all_reduce: weight {w} is not a finite number >= 0")));
    }
    if let Some(short) = buffers.iter().find(|b| b.bytes < 4 * len as u64) {
        return Err(KilnError::Usage(format!("all_reduce: a buffer of {} bytes cannot hold {len} floats", short.bytes)));
    }
    let mut timing = AllReduceTiming { bytes: 4 * len as u64, replicas: buffers.len(), ..Default::default() };
    if len == 0 {
        return Ok(timing);
    }
    // Buckets start at offsets every device can bind and copy from (256 bytes covers every adapter's alignment).
    let bucket = ((bucket_bytes.max(256) / 256 * 256) / 4) as usize;
    let ranges: Vec<(usize, usize)> = (0..len).step_by(bucket).map(|s| (s, (s + bucket).min(len))).collect();
    let contributing: Vec<usize> = (0..buffers.len()).filter(|&i| weights[i] > 0.0).collect();
    // Every copy is started before any is waited for: the devices copy while the host reduces.
    let mut pending: Vec<Vec<kiln_graph::backend::Readback>> = Vec::with_capacity(ranges.len());
    for &(s, e) in &ranges {
        let reads = contributing.iter().map(|&i| buffers[i].device().read_start(&buffers[i].sub(4 * s as u64, 4 * (e - s) as u64))).collect::<std::result::Result<Vec<_>, _>>()?;
        pending.push(reads);
    }
    let mut sum = vec![0f64; bucket.min(len)];
    let mut out = vec![0f32; bucket.min(len)];
    for (&(s, e), reads) in ranges.iter().zip(pending) {
        let n = e - s;
        let wait_started = Instant::now();
        let parts = reads.into_iter().map(|r| r.wait()).collect::<std::result::Result<Vec<_>, _>>()?;
        timing.wait_ms += wait_started.elapsed().as_secs_f64() * 1e3;
        let reduce_started = Instant::now();
        sum[..n].fill(0.0);
        for (bytes, &i) in parts.iter().zip(&contributing) {
            let w = weights[i];
            for (acc, v) in sum[..n].iter_mut().zip(bytes.chunks_exact(4)) {
                *acc += w * f32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f64;
            }
        }
        timing.reduce_ms += reduce_started.elapsed().as_secs_f64() * 1e3;
        if let Some(c) = across {
            let across_started = Instant::now();
            c.sum_f64(&mut sum[..n])?;
            timing.across_ms += across_started.elapsed().as_secs_f64() * 1e3;
        }
        for (o, v) in out[..n].iter_mut().zip(&sum[..n]) {
            *o = *v as f32;
        }
        for b in buffers {
            b.device().write(&b.sub(4 * s as u64, 4 * n as u64), bytemuck::cast_slice(&out[..n]))?;
        }
    }
    timing.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(timing)
}

/// Averages the gradients the replicas' optimizers gathered this step ([`Optimizer::accumulate`]) with weights
/// `shares` (each replica's samples; a replica with no samples contributes nothing but still receives the
/// average), then marks every parameter that got a gradient anywhere as having one everywhere, so the next
/// [`Optimizer::apply`] updates every replica alike. The optimizers must be of replicas of one model.
pub fn all_reduce_gradients(optimizers: &mut [&mut Optimizer], shares: &[usize], bucket_bytes: u64) -> Result<AllReduceTiming> {
    let total = shares.iter().sum();
    all_reduce_gradients_across(optimizers, shares, total, bucket_bytes, None)
}

/// [`all_reduce_gradients`] over this process's replicas and, with `across`, every rank's: `total` is the
/// samples of the whole step on all ranks (each replica's weight is its share of it), the same on every rank.
pub fn all_reduce_gradients_across(optimizers: &mut [&mut Optimizer], shares: &[usize], total: usize, bucket_bytes: u64, across: Option<&dyn Collective>) -> Result<AllReduceTiming> {
    if optimizers.len() != shares.len() || optimizers.is_empty() {
        return Err(KilnError::Usage(format!("all_reduce_gradients: {} optimizers and {} shares (one share per optimizer, at least one)", optimizers.len(), shares.len())));
    }
    let len = optimizers[0].gradient_buffer().1;
    let params = optimizers[0].gradient_flags().len();
    // Which parameters got a gradient on any replica that saw samples, on any rank.
    let mut any = vec![0f64; params];
    for (o, &n) in optimizers.iter().zip(shares) {
        let flags = o.gradient_flags();
        if o.gradient_buffer().1 != len || flags.len() != params {
            return Err(KilnError::Usage(format!(
                "all_reduce_gradients: the replicas differ ({params} parameters in {len} elements against {} in {}): each must be built the same way",
                flags.len(),
                o.gradient_buffer().1
            )));
        }
        if n > 0 {
            for (a, f) in any.iter_mut().zip(flags) {
                *a += f64::from(u8::from(f));
            }
        }
    }
    if let Some(c) = across {
        c.sum_f64(&mut any)?;
    }
    let any: Vec<bool> = any.iter().map(|&v| v > 0.0).collect();
    // A replica whose gradients were never gathered this step holds stale ones: it must not be read.
    let weights: Vec<f64> = optimizers.iter().zip(shares).map(|(o, &n)| if n > 0 && o.gradient_flags().iter().any(|&f| f) { n as f64 / total.max(1) as f64 } else { 0.0 }).collect();
    let buffers: Vec<BufView> = optimizers.iter().map(|o| o.gradient_buffer().0.clone()).collect();
    let timing = all_reduce_across(&buffers, len, &weights, bucket_bytes, across)?;
    for o in optimizers.iter_mut() {
        o.set_gradient_flags(&any);
    }
    Ok(timing)
}

/// Copies replica 0's parameters, buffers (batch norm's running statistics) and counters, and its optimizer's
/// state, to the other replicas: how replicas start equal (after a `--from` or a `--resume` loaded into replica
/// 0), and how the replicas' buffers, which each replica updates from its own samples, are brought back to
/// replica 0's (PyTorch DDP broadcasts rank 0's buffers the same way).
pub fn broadcast(from: (&VarStore, &Optimizer), to: &mut [(&VarStore, &mut Optimizer)], with_optimizer: bool) -> Result<()> {
    let ck = from.0.to_checkpoint()?;
    let state = if with_optimizer { Some(from.1.state_checkpoint(from.0)?) } else { None };
    for (vs, opt) in to.iter_mut() {
        vs.load_checkpoint("replica 0", &ck, true, |_| true).map_err(|e| KilnError::Usage(format!("broadcast to a replica: {e}")))?;
        if let Some(state) = &state {
            opt.load_state("replica 0", state).map_err(|e| KilnError::Usage(format!("broadcast to a replica: {e}")))?;
        }
    }
    Ok(())
}

/// Only the buffers (running statistics) of replica 0, to the others: a cheap [`broadcast`] for epoch ends.
pub fn broadcast_buffers(from: &VarStore, to: &[&VarStore]) -> Result<()> {
    let names: Vec<String> = from.params().filter(|p| from.is_buffer(p.name())).map(|p| p.name().to_string()).collect();
    if names.is_empty() || to.is_empty() {
        return Ok(());
    }
    let ck = from.to_checkpoint()?;
    let ck = crate::checkpoint::Checkpoint { tensors: ck.tensors.into_iter().filter(|t| names.contains(&t.name)).collect(), ..ck };
    for vs in to {
        vs.load_checkpoint("replica 0", &ck, false, |name| names.iter().any(|n| n == name)).map_err(|e| KilnError::Usage(format!("broadcast to a replica: {e}")))?;
    }
    Ok(())
}

/// A 64-bit FNV-1a hash of a store's parameter bits (the flat buffer, padding included) and its buffers':
/// equal on two replicas exactly when they hold the same values.
pub fn checksum(vs: &VarStore) -> Result<u64> {
    let mut h = checksum_parameters(vs)?;
    for p in vs.params().filter(|p| vs.is_buffer(p.name())) {
        h = fnv(h, bytemuck::cast_slice(&p.tensor()?.to_vec()?));
    }
    Ok(h)
}

/// [`checksum`] of the trainable parameters alone (the flat buffer).
pub fn checksum_parameters(vs: &VarStore) -> Result<u64> {
    let flat = vs.flat()?;
    Ok(fnv(0xcbf2_9ce4_8422_2325, &flat.device().read(&flat.sub(0, 4 * vs.flat_len() as u64))?))
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The rows of a batch of `n` samples each of `replicas` gets: contiguous, the first `n % replicas` one larger
/// (a replica gets none when `n < replicas`).
pub fn shard_ranges(n: usize, replicas: usize) -> Vec<std::ops::Range<usize>> {
    let replicas = replicas.max(1);
    let (base, extra) = (n / replicas, n % replicas);
    let mut start = 0;
    (0..replicas)
        .map(|i| {
            let len = base + usize::from(i < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// Devices for data parallelism from a `--devices` list: adapter indices from `kiln info` or name substrings,
/// comma-separated (`0,1`), a name repeated for several logical devices on one adapter (`0,0`), or `all` (one
/// device per adapter). Each entry opens its own device. Errors name an adapter that does not exist and list
/// the ones that do.
pub fn open_devices(list: &str) -> Result<Vec<Device>> {
    let adapters = kiln_graph::backend::list_adapters();
    let described = || adapters.iter().enumerate().map(|(i, a)| format!("{i}: {} ({})", a.name, a.backend)).collect::<Vec<_>>().join("; ");
    let entries: Vec<String> = if list.trim() == "all" { distinct_adapters().iter().map(|i| i.to_string()).collect() } else { list.split(',').map(|s| s.trim().to_string()).collect() };
    if entries.is_empty() || entries.iter().any(|e| e.is_empty()) {
        return Err(KilnError::Usage(format!("--devices {list:?}: give adapter indices or names separated by commas (adapters: {})", described())));
    }
    let devices = entries
        .iter()
        .map(|e| {
            let exists = match e.parse::<usize>() {
                Ok(i) => i < adapters.len(),
                Err(_) => adapters.iter().any(|a| format!("{} {}", a.name, a.backend).to_lowercase().contains(&e.to_lowercase())),
            };
            if !exists {
                return Err(KilnError::Usage(format!("--devices {list}: there is no adapter {e:?} (adapters: {})", if adapters.is_empty() { "none".into() } else { described() })));
            }
            Ok(Device::open(&kiln_graph::backend::DeviceOptions { adapter: Some(e.clone()), ..Default::default() })?)
        })
        .collect::<Result<Vec<Device>>>()?;
    // Replicas must round alike to stay equal bit for bit: kernels such as Adam's square root are not exactly
    // rounded, and adapters of two kinds round them differently.
    if let Some(other) = devices.iter().find(|d| d.adapter_name() != devices[0].adapter_name()) {
        return Err(KilnError::Usage(format!(
            "--devices {list}: data-parallel replicas must run on adapters of one kind (their kernels round alike only then); got {} and {}",
            devices[0].adapter_name(),
            other.adapter_name()
        )));
    }
    Ok(devices)
}

/// The adapters a data-parallel run spreads over by default (`--devices all`, an MPI rank's choice): those of
/// the first adapter's kind (name) on its backend, so a GPU that several backends list counts once and two
/// identical GPUs count twice; software renderers only when there is nothing else.
pub fn distinct_adapters() -> Vec<usize> {
    let adapters = kiln_graph::backend::list_adapters();
    let hardware = adapters.iter().any(|a| a.device_type != "Cpu");
    let Some(first) = adapters.iter().find(|a| !hardware || a.device_type != "Cpu") else { return Vec::new() };
    adapters.iter().enumerate().filter(|(_, a)| a.name == first.name && a.backend == first.backend).map(|(i, _)| i).collect()
}
