//! Training-step benchmarks on synthetic batches: ms per step (median), samples/s, submits per step, GPU
//! buffers created after the first step, peak GPU memory — for `kiln bench`.

use std::time::Instant;

use kiln_graph::backend::{gpu, thread_stats};
use kiln_graph::{loss, KilnError, Rng, Tensor};
use kiln_nn::schedule::Schedule;
use kiln_nn::{Layer, Module, Optimizer, OptimizerKind, VarStore};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct StepBench {
    pub model: String,
    pub batch: usize,
    pub adapter: String,
    pub ms_per_step: f64,
    pub samples_per_s: f64,
    pub submits_per_step: f64,
    pub buffers_created_after_first_step: u64,
    pub bytes_created_after_first_step: u64,
    /// Host time to record a step (forward, backward, optimizer) before waiting on the GPU.
    pub host_ms_per_step: f64,
    /// Bind groups made per timed step (0 once a step's buffers repeat: every dispatch reuses a cached one).
    pub bind_groups_per_step: f64,
    pub peak_gpu_bytes: u64,
    /// The most bytes live at once during the timed steps beyond what was live before them (the step's
    /// working set: activations, gradients, texture copies).
    pub step_peak_bytes: u64,
    /// Bytes of buffers handed out per timed step, from the pool or new: above `step_peak_bytes` when buffers
    /// freed at a tensor's last use serve later tensors of the same step.
    pub bytes_handed_out_per_step: f64,
    pub parameters: usize,
    /// Under profiling (`KILN_PROFILE=1`): each kernel's dispatches and GPU ms per step, slowest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<KernelShare>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelShare {
    pub kernel: String,
    pub dispatches_per_step: f64,
    pub ms_per_step: f64,
}

/// Times `steps` training steps (forward, backward, Adam, loss readback) of an architecture from the zoo on
/// random [batch, c, h, w] images after two warm-up steps.
pub fn bench_step(name: &str, input: [usize; 3], classes: usize, batch: usize, steps: usize) -> Result<StepBench, KilnError> {
    let g = gpu()?;
    g.sync()?;
    g.reset_peak();
    let mut vs = VarStore::new(1);
    let mut net = kiln_models::zoo::build_named(&mut vs, name, input, classes, 1)?;
    vs.finish()?;
    net.set_training(true);
    let mut opt = Optimizer::new(&vs, OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 1e-3, 0.0, Schedule::constant(), steps as u64 + 2)?;
    let mut rng = Rng::new(7);
    let x = Tensor::randn(&[batch, input[0], input[1], input[2]], 1.0, &mut rng)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
    let y = Tensor::from_u32(&labels, &[batch])?;
    let mut host = Vec::with_capacity(steps);
    let mut step = |host: &mut Vec<f64>| -> Result<f64, KilnError> {
        let t = Instant::now();
        let l = loss::cross_entropy(&net.forward(&x)?, &y)?;
        let grads = l.backward()?;
        opt.step(&vs, &grads)?;
        host.push(t.elapsed().as_secs_f64() * 1e3);
        l.to_scalar()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    step(&mut host)?;
    let after_first = thread_stats();
    step(&mut host)?;
    host.clear();
    let warm = thread_stats();
    g.profile_take()?;
    let (peak_before, live_before) = (g.stats().peak_live_bytes, g.stats().live_bytes);
    g.reset_peak();
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        times.push(step(&mut host)?);
    }
    let per_step = steps.max(1) as f64;
    let kernels = g.profile_take()?.into_iter().map(|k| KernelShare { kernel: k.kernel, dispatches_per_step: k.dispatches as f64 / per_step, ms_per_step: k.ms / per_step }).collect();
    host.sort_by(f64::total_cmp);
    let end = thread_stats();
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    Ok(StepBench {
        model: name.into(),
        batch,
        adapter: g.adapter_name(),
        ms_per_step: ms,
        samples_per_s: batch as f64 * 1e3 / ms,
        submits_per_step: (end.submits - after_first.submits) as f64 / (steps.max(1) + 1) as f64,
        buffers_created_after_first_step: end.buffers_created - after_first.buffers_created,
        bytes_created_after_first_step: end.bytes_created - after_first.bytes_created,
        host_ms_per_step: host[host.len() / 2],
        bind_groups_per_step: (end.bind_groups_created - warm.bind_groups_created) as f64 / steps.max(1) as f64,
        peak_gpu_bytes: peak_before.max(g.stats().peak_live_bytes),
        step_peak_bytes: g.stats().peak_live_bytes.saturating_sub(live_before),
        bytes_handed_out_per_step: (end.bytes_handed_out - warm.bytes_handed_out) as f64 / steps.max(1) as f64,
        parameters: vs.num_values(),
        kernels,
    })
}
