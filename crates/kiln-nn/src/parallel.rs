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
    /// Bucket copies that started while their replica's backward pass was still running
    /// ([`OverlappedAllReduce`]; 0 for an all-reduce after the backward).
    pub overlapped_buckets: usize,
    /// Bucket copies in all (buckets times the replicas that contributed).
    pub bucket_copies: usize,
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
    let contributing: Vec<usize> = (0..buffers.len()).filter(|&i| weights[i] > 0.0).collect();
    // Every copy is started before any is waited for: the devices copy while the host reduces.
    let mut buckets = Vec::new();
    for (s, e) in bucket_ranges(len, bucket_bytes) {
        let reads = contributing.iter().map(|&i| buffers[i].device().read_start(&buffers[i].sub(4 * s as u64, 4 * (e - s) as u64))).collect::<std::result::Result<Vec<_>, _>>()?;
        buckets.push(((s, e), reads));
    }
    reduce_buckets(buffers, &contributing, weights, buckets, across, &mut timing)?;
    timing.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(timing)
}

/// The buckets of a buffer of `len` floats: element ranges starting at offsets every device can bind and copy
/// from (256 bytes covers every adapter's alignment).
fn bucket_ranges(len: usize, bucket_bytes: u64) -> Vec<(usize, usize)> {
    let bucket = ((bucket_bytes.max(256) / 256 * 256) / 4) as usize;
    (0..len).step_by(bucket).map(|s| (s, (s + bucket).min(len))).collect()
}

/// Reduces buckets whose copies back are in flight (one per contributing replica, in `contributing`'s order), in
/// the order given: each weighted sum in f64, across the ranks too, written back to every buffer.
fn reduce_buckets(
    buffers: &[BufView],
    contributing: &[usize],
    weights: &[f64],
    buckets: Vec<((usize, usize), Vec<kiln_graph::backend::Readback>)>,
    across: Option<&dyn Collective>,
    timing: &mut AllReduceTiming,
) -> Result<()> {
    let longest = buckets.iter().map(|((s, e), _)| e - s).max().unwrap_or(0);
    let mut sum = vec![0f64; longest];
    let mut out = vec![0f32; longest];
    for ((s, e), reads) in buckets {
        let n = e - s;
        let wait_started = Instant::now();
        let parts = reads.into_iter().map(|r| r.wait()).collect::<std::result::Result<Vec<_>, _>>()?;
        timing.wait_ms += wait_started.elapsed().as_secs_f64() * 1e3;
        let reduce_started = Instant::now();
        sum[..n].fill(0.0);
        for (bytes, &i) in parts.iter().zip(contributing) {
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
    Ok(())
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
    let (len, any, weights) = gradient_weights(optimizers, shares, total)?;
    let buffers: Vec<BufView> = optimizers.iter().map(|o| o.gradient_buffer().0.clone()).collect();
    let timing = all_reduce_across(&buffers, len, &weights, bucket_bytes, across)?;
    set_flags_across(optimizers, any, across)?;
    Ok(timing)
}

/// The flat gradients' length, which parameters got a gradient on a replica of this process that saw samples
/// (one count per parameter), and each replica's weight: its share of `total`, or 0 for a replica without
/// samples or gradients (its buffer holds stale values and must not be read).
fn gradient_weights(optimizers: &[&mut Optimizer], shares: &[usize], total: usize) -> Result<(usize, Vec<f64>, Vec<f64>)> {
    if optimizers.len() != shares.len() || optimizers.is_empty() {
        return Err(KilnError::Usage(format!("all_reduce_gradients: {} optimizers and {} shares (one share per optimizer, at least one)", optimizers.len(), shares.len())));
    }
    let len = optimizers[0].gradient_buffer().1;
    let params = optimizers[0].gradient_flags().len();
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
    let weights: Vec<f64> = optimizers.iter().zip(shares).map(|(o, &n)| if n > 0 && o.gradient_flags().iter().any(|&f| f) { n as f64 / total.max(1) as f64 } else { 0.0 }).collect();
    Ok((len, any, weights))
}

/// Marks every parameter that got a gradient on any replica of any rank (the counts of `gradient_weights`,
/// summed across the ranks after the buckets) as having one on every replica.
fn set_flags_across(optimizers: &mut [&mut Optimizer], mut any: Vec<f64>, across: Option<&dyn Collective>) -> Result<()> {
    if let Some(c) = across {
        c.sum_f64(&mut any)?;
    }
    let any: Vec<bool> = any.iter().map(|&v| v > 0.0).collect();
    for o in optimizers.iter_mut() {
        o.set_gradient_flags(&any);
    }
    Ok(())
}

/// The gradient all-reduce of one step, started during the backward passes (PyTorch DDP's bucketed overlap, as
/// far as wgpu allows it). Each replica's backward (`Tensor::backward_with`) hands every parameter's gradient
/// over as soon as it is final, the last layers' first; [`OverlappedAllReduce::gradient_ready`] gathers it into
/// the flat buffer, and once every gradient of a bucket is there, that bucket's copy to the host is submitted
/// at once, with the backward work recorded so far, while the backward of the earlier layers is still being
/// recorded and run.
///
/// With [`OverlappedAllReduce::reduce_eagerly`], the sums start during the backward as well: when the last
/// replica of the process completes a bucket, the bucket it completed before is reduced (its copies waited
/// for, summed, summed across the ranks, written back) while the device runs the backward work already
/// submitted. [`OverlappedAllReduce::finish`] reduces the rest. Buckets are reduced in the order the last
/// replica completed them, the same on every rank (the same model), and each bucket's sum is that of
/// [`all_reduce_gradients_across`], bit for bit.
pub struct OverlappedAllReduce {
    ranges: Vec<(usize, usize)>,
    /// For each parameter slot, the buckets it overlaps.
    slot_buckets: Vec<Vec<usize>>,
    /// Per replica and bucket: parameter slots still to come, and the copy once started.
    remaining: Vec<Vec<usize>>,
    reads: Vec<Vec<Option<kiln_graph::backend::Readback>>>,
    /// Copies started before their replica's backward had ended.
    early: usize,
    /// Buckets in the order the last replica completed them, and whether each is reduced.
    order: Vec<usize>,
    reduced: Vec<bool>,
    /// Reduce during the backward: every replica's weight and flat buffer.
    eager: Option<(Vec<f64>, Vec<BufView>)>,
    timing: AllReduceTiming,
}

impl OverlappedAllReduce {
    /// For the replicas of `optimizers` (one model's replicas; checked again by `finish`).
    pub fn new(optimizers: &[&Optimizer], bucket_bytes: u64) -> Result<OverlappedAllReduce> {
        let first = optimizers.first().ok_or_else(|| KilnError::Usage("OverlappedAllReduce: no replica".into()))?;
        let ranges = bucket_ranges(first.gradient_buffer().1, bucket_bytes);
        let slots = first.gradient_flags().len();
        let slot_buckets: Vec<Vec<usize>> = (0..slots)
            .map(|i| {
                let (o, n) = first.gradient_slot(i);
                ranges.iter().enumerate().filter(|(_, (s, e))| n > 0 && o < *e && o + n > *s).map(|(b, _)| b).collect()
            })
            .collect();
        let mut per_bucket = vec![0usize; ranges.len()];
        slot_buckets.iter().flatten().for_each(|&b| per_bucket[b] += 1);
        let reads = optimizers.iter().map(|_| ranges.iter().map(|_| None).collect()).collect();
        let reduced = vec![false; ranges.len()];
        Ok(OverlappedAllReduce { ranges, slot_buckets, remaining: vec![per_bucket; optimizers.len()], reads, early: 0, order: Vec::new(), reduced, eager: None, timing: AllReduceTiming::default() })
    }

    /// Sums buckets during the backward too (see the type). Only when every replica of every rank has samples
    /// this step, each weighted by `weights` (its share of the whole batch), the replicas run one after the
    /// other in index order, and nothing else calls the ranks' collectives during the backward (synchronised
    /// batch norm does): every rank must make the same calls in the same order.
    pub fn reduce_eagerly(&mut self, optimizers: &[&Optimizer], weights: Vec<f64>) {
        self.eager = Some((weights, optimizers.iter().map(|o| o.gradient_buffer().0.clone()).collect()));
    }

    fn start(&mut self, replica: usize, opt: &Optimizer, bucket: usize) -> Result<()> {
        if self.reads[replica][bucket].is_none() {
            let (s, e) = self.ranges[bucket];
            let buffer = opt.gradient_buffer().0;
            self.reads[replica][bucket] = Some(buffer.device().read_start(&buffer.sub(4 * s as u64, 4 * (e - s) as u64))?);
            if replica + 1 == self.reads.len() {
                self.order.push(bucket);
            }
        }
        Ok(())
    }

    /// Bucket `b`, all of whose copies have started, reduced (`contributing`: the replicas read).
    fn reduce(&mut self, b: usize, buffers: &[BufView], contributing: &[usize], weights: &[f64], across: Option<&dyn Collective>) -> Result<()> {
        if std::mem::replace(&mut self.reduced[b], true) {
            return Ok(());
        }
        let reads = contributing
            .iter()
            .map(|&i| self.reads[i][b].take().ok_or_else(|| KilnError::Usage(format!("OverlappedAllReduce: replica {i}'s copy of bucket {b} never started"))))
            .collect::<Result<Vec<_>>>()?;
        reduce_buckets(buffers, contributing, weights, vec![(self.ranges[b], reads)], across, &mut self.timing)
    }

    /// Replica `replica`'s gradient for parameter slot `slot` (what `Optimizer::accumulate_param` returned) is in
    /// its flat buffer: the copies of the buckets this completes start now (and, reducing eagerly, the bucket
    /// the last replica completed before is reduced). `across`: the ranks, when reducing eagerly.
    pub fn gradient_ready(&mut self, replica: usize, opt: &Optimizer, slot: usize, across: Option<&dyn Collective>) -> Result<()> {
        for b in self.slot_buckets.get(slot).cloned().unwrap_or_default() {
            let left = &mut self.remaining[replica][b];
            *left = left.saturating_sub(1);
            if *left == 0 && self.reads[replica][b].is_none() {
                self.start(replica, opt, b)?;
                self.early += 1;
                if let (true, Some((weights, buffers))) = (replica + 1 == self.reads.len() && self.order.len() >= 2, self.eager.clone()) {
                    let previous = self.order[self.order.len() - 2];
                    let started = Instant::now();
                    let all: Vec<usize> = (0..buffers.len()).collect();
                    self.reduce(previous, &buffers, &all, &weights, across)?;
                    self.timing.total_ms += started.elapsed().as_secs_f64() * 1e3;
                }
            }
        }
        Ok(())
    }

    /// Bucket copies started so far, of every replica.
    pub fn copies_started(&self) -> usize {
        self.reads.iter().flatten().filter(|r| r.is_some()).count() + self.reduced.iter().filter(|&&r| r).count() * self.reads.len()
    }

    /// Buckets summed so far (during the backward, when reducing eagerly).
    pub fn buckets_reduced(&self) -> usize {
        self.reduced.iter().filter(|&&r| r).count()
    }

    /// Replica `replica`'s backward has ended: the buckets still waiting (parameters that got no gradient) start.
    pub fn backward_done(&mut self, replica: usize, opt: &Optimizer) -> Result<()> {
        (0..self.ranges.len()).try_for_each(|b| if self.reduced[b] { Ok(()) } else { self.start(replica, opt, b) })
    }

    /// The rest of the all-reduce of [`all_reduce_gradients_across`] on the copies started so far (starting any
    /// that a replica with samples still lacks), then every replica's gradient flags as there. The timing's
    /// `total_ms` counts what ran during the backward (eager sums) as well as after it.
    pub fn finish(mut self, optimizers: &mut [&mut Optimizer], shares: &[usize], total: usize, across: Option<&dyn Collective>) -> Result<AllReduceTiming> {
        let started = Instant::now();
        if optimizers.len() != self.reads.len() {
            return Err(KilnError::Usage(format!("OverlappedAllReduce: made for {} replicas, finished with {}", self.reads.len(), optimizers.len())));
        }
        let (len, any, weights) = gradient_weights(optimizers, shares, total)?;
        if let Some((eager, _)) = &self.eager {
            if *eager != weights {
                return Err(KilnError::Usage(format!("OverlappedAllReduce: reduced during the backward with weights {eager:?}, but the step's are {weights:?}")));
            }
        }
        let contributing: Vec<usize> = (0..optimizers.len()).filter(|&i| weights[i] > 0.0).collect();
        for &i in &contributing {
            self.backward_done(i, optimizers[i])?;
        }
        let buffers: Vec<BufView> = optimizers.iter().map(|o| o.gradient_buffer().0.clone()).collect();
        // In the order the last replica completed them (last layers first), then any never completed.
        let order: Vec<usize> = self.order.iter().copied().chain((0..self.ranges.len()).rev()).collect();
        for b in order {
            self.reduce(b, &buffers, &contributing, &weights, across)?;
        }
        set_flags_across(optimizers, any, across)?;
        let copies = self.ranges.len() * contributing.len();
        let mut timing = AllReduceTiming { bytes: 4 * len as u64, replicas: buffers.len(), overlapped_buckets: self.early.min(copies), bucket_copies: copies, ..self.timing };
        timing.total_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(timing)
    }
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

// A replica's place in a data-parallel step: the first row of its shard (dropout draws the masks those rows get
// on one device) and, with synchronised batch norm, the group it sums batch statistics with.

/// Sums statistics over every replica of a data-parallel step, on every rank: synchronised batch norm's
/// collective. Every replica runs the same model, so they make the same calls in the same order; `tag` names
/// each call, and replicas that disagree get an error instead of a wrong sum.
pub trait StatsReducer {
    /// Sums `values` element-wise over the replicas (in f64, in a fixed order: every replica gets the same bits).
    fn sum(&self, tag: &str, values: &mut [f64]) -> Result<()>;
    /// This replica's weight in the step's loss: its share of the whole batch (all ranks).
    fn weight(&self) -> f64;
}

/// Where a replica stands in a data-parallel step (see [`in_shard`]).
#[derive(Clone, Default)]
pub struct ShardContext {
    /// The shard's first row within the whole step's batch (all ranks).
    pub first_row: usize,
    /// Synchronised batch norm's collective; `None`: each replica normalises with its own shard's statistics.
    pub stats: Option<std::rc::Rc<dyn StatsReducer>>,
}

thread_local! {
    static SHARD: std::cell::RefCell<Option<ShardContext>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a replica's forward and backward) as the shard `ctx` describes: layers read it through
/// [`shard_first_row`] and [`stats_reducer`]. Outside any shard, a model trains as on one device.
pub fn in_shard<T>(ctx: ShardContext, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<ShardContext>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SHARD.with(|s| *s.borrow_mut() = previous);
        }
    }
    let _restore = Restore(SHARD.with(|s| s.borrow_mut().replace(ctx)));
    f()
}

/// The current shard's first row in the whole batch (0 outside a data-parallel step).
pub fn shard_first_row() -> usize {
    SHARD.with(|s| s.borrow().as_ref().map_or(0, |c| c.first_row))
}

/// Synchronised batch norm's collective for the current shard, if the step has one.
pub fn stats_reducer() -> Option<std::rc::Rc<dyn StatsReducer>> {
    SHARD.with(|s| s.borrow().as_ref().and_then(|c| c.stats.clone()))
}

/// The replicas of one process in a step with synchronised batch norm, each on its own thread (their forward
/// passes must meet at every batch-norm layer). Member 0 runs on the calling thread: it sums the members'
/// contributions in member order and, in a distributed run, across the ranks.
pub struct ThreadGroup {
    state: std::sync::Mutex<GroupState>,
    turn: std::sync::Condvar,
}

struct GroupState {
    round: u64,
    slots: Vec<Option<(String, Vec<f64>)>>,
    result: Vec<f64>,
    failed: Option<String>,
}

impl ThreadGroup {
    pub fn new(members: usize) -> std::sync::Arc<ThreadGroup> {
        let state = GroupState { round: 0, slots: vec![None; members.max(1)], result: Vec::new(), failed: None };
        std::sync::Arc::new(ThreadGroup { state: std::sync::Mutex::new(state), turn: std::sync::Condvar::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the group: every member waiting now or later gets an error saying why (a member failed, so the
    /// others must not wait for it).
    pub fn fail(&self, why: &str) {
        let mut st = self.lock();
        st.failed.get_or_insert_with(|| why.to_string());
        self.turn.notify_all();
    }

    fn failure(why: &str) -> KilnError {
        KilnError::Usage(format!("synchronised batch norm: {why}"))
    }

    /// Member `index`'s contribution to the round; returns when the round's sum is in `values`.
    pub fn contribute(&self, index: usize, tag: &str, values: &mut [f64], across: Option<&dyn Collective>) -> Result<()> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(Self::failure(why));
        }
        let round = st.round;
        st.slots[index] = Some((tag.to_string(), values.to_vec()));
        self.turn.notify_all();
        if index != 0 {
            while st.failed.is_none() && st.round == round {
                st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.round == round {
                return Err(Self::failure(st.failed.as_deref().unwrap_or("the group ended")));
            }
            values.copy_from_slice(&st.result);
            return Ok(());
        }
        while st.failed.is_none() && st.slots.iter().any(Option::is_none) {
            st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(why) = &st.failed {
            return Err(Self::failure(why));
        }
        let mut sum = vec![0f64; values.len()];
        let mut mismatch = None;
        for (i, slot) in st.slots.iter().enumerate() {
            let (t, v) = slot.as_ref().expect("every slot is filled");
            if t != tag || v.len() != sum.len() {
                mismatch = Some(format!("replica {i} reached {t:?} ({} values) where replica 0 reached {tag:?} ({} values): the replicas run different models", v.len(), sum.len()));
                break;
            }
            sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
        }
        let across_result = match (&mismatch, across) {
            (None, Some(c)) => c.sum_f64(&mut sum),
            _ => Ok(()),
        };
        if let Some(why) = mismatch.or_else(|| across_result.err().map(|e| e.to_string())) {
            st.failed = Some(why.clone());
            self.turn.notify_all();
            return Err(Self::failure(&why));
        }
        values.copy_from_slice(&sum);
        st.result = sum;
        st.slots.iter_mut().for_each(|s| *s = None);
        st.round += 1;
        self.turn.notify_all();
        Ok(())
    }
}

/// One replica's membership of a [`ThreadGroup`]: its [`StatsReducer`].
pub struct GroupMember {
    pub group: std::sync::Arc<ThreadGroup>,
    pub index: usize,
    pub weight: f64,
    /// The ranks of a distributed run (member 0 only: it sums across them for the process).
    pub across: Option<Distributed>,
}

impl StatsReducer for GroupMember {
    fn sum(&self, tag: &str, values: &mut [f64]) -> Result<()> {
        self.group.contribute(self.index, tag, values, self.across.as_ref().map(|d| &*d.0))
    }
    fn weight(&self) -> f64 {
        self.weight
    }
}

/// `x` summed over every replica of the step through the shard's [`stats_reducer`] (an error outside a step that
/// has one): a differentiable collective, what synchronised batch norm's statistics are made of. The backward sums the incoming gradients the same way, each weighted by
/// its replica's share of the loss, and divides by this replica's weight: the gradient all-reduce then weights
/// everything this replica computed by that share again, so each replica's part of the total gradient is exact.
pub fn all_reduce_sum(x: &kiln_graph::Tensor, tag: &str) -> Result<kiln_graph::Tensor> {
    // The op finds the reducer on its thread, forward and backward: reducers are not `Send`, custom ops must be.
    kiln_graph::Tensor::custom_op(AllReduceSum { tag: tag.to_string() }, &[x])
}

struct AllReduceSum {
    tag: String,
}

impl AllReduceSum {
    /// Forward: the plain sum. Backward (`weighted`): sum_r w_r g_r / w_self.
    fn reduce(&self, x: &kiln_graph::Tensor, phase: &str, weighted: bool) -> Result<kiln_graph::Tensor> {
        let reducer = stats_reducer().ok_or_else(|| KilnError::Usage(format!("{}: all_reduce_sum outside a data-parallel step with synchronised batch norm", self.tag)))?;
        let w = weighted.then(|| reducer.weight());
        let mut values: Vec<f64> = x.to_vec()?.into_iter().map(|v| v as f64 * w.unwrap_or(1.0)).collect();
        reducer.sum(&format!("{} {phase}", self.tag), &mut values)?;
        let out: Vec<f32> = values.into_iter().map(|v| (v / w.unwrap_or(1.0)) as f32).collect();
        kiln_graph::Tensor::from_slice_on(x.device(), &out, x.shape())
    }
}

impl kiln_graph::custom::CustomOp for AllReduceSum {
    fn name(&self) -> &str {
        "all_reduce_sum"
    }
    fn forward(&self, inputs: &[&kiln_graph::Tensor]) -> Result<kiln_graph::Tensor> {
        self.reduce(inputs[0], "forward", false)
    }
    fn backward(&self, _inputs: &[&kiln_graph::Tensor], _output: &kiln_graph::Tensor, grad_output: &kiln_graph::Tensor) -> Result<Vec<Option<kiln_graph::Tensor>>> {
        Ok(vec![Some(self.reduce(grad_output, "backward", true)?)])
    }
}
