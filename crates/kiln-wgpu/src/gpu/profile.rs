//! Profiling: per-kernel GPU time from timestamps around each dispatch, and timing a closure's GPU work.

use super::*;

/// Per-kernel GPU time under profiling: timestamps around each dispatch, read back at each submit.
#[derive(Default)]
pub(super) struct Profile {
    pub(super) query_set: Option<wgpu::QuerySet>,
    /// The kernel of each timestamp pair recorded since the last submit.
    pub(super) pending: Vec<String>,
    pub(super) totals: HashMap<String, (u64, f64)>,
}

/// One kernel's share of the GPU time since profiling began (`Gpu::profile_take`).
#[derive(Clone, Debug)]
pub struct KernelTime {
    /// `shader::entry` and its override constants.
    pub kernel: String,
    pub dispatches: u64,
    pub ms: f64,
}

impl Gpu {
    /// Waits for the submitted copy of resolved timestamps into `readback` and returns them.
    pub(super) fn read_timestamps(&self, readback: &wgpu::Buffer) -> Result<Vec<u64>> {
        let (tx, rx) = std::sync::mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Poll(e.to_string()))?;
        rx.recv().map_err(|e| GpuError::Poll(e.to_string()))?.map_err(|e| GpuError::Poll(e.to_string()))?;
        let ticks = {
            let view = readback.get_mapped_range(..).map_err(|e| GpuError::Poll(e.to_string()))?;
            view.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
        };
        readback.unmap();
        Ok(ticks)
    }

    /// Waits for a profiled submit and adds each dispatch's time to its kernel's total.
    pub(super) fn collect_profile(&self, readback: &wgpu::Buffer, kernels: Vec<String>) -> Result<()> {
        let ticks = self.read_timestamps(readback)?;
        let period = self.queue.get_timestamp_period() as f64;
        let mut st = self.lock();
        for (kernel, t) in kernels.into_iter().zip(ticks.chunks_exact(2)) {
            let entry = st.profile.totals.entry(kernel).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += t[1].saturating_sub(t[0]) as f64 * period / 1e6;
        }
        Ok(())
    }

    /// Turns per-dispatch profiling on or off (also `KILN_PROFILE=1`). While on, each dispatch runs in a compute
    /// pass of its own between two timestamps and each submit waits for its timings: slower, for finding where
    /// a step's time goes, not for timing it. `gpu_time_ms` reports None while it is on.
    pub fn set_profiling(&self, on: bool) {
        self.profiling.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn profiling(&self) -> bool {
        self.profiling.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The per-kernel GPU time gathered since the last call, slowest first; clears it.
    pub fn profile_take(&self) -> Result<Vec<KernelTime>> {
        self.flush()?;
        let totals = std::mem::take(&mut self.lock().profile.totals);
        let mut out: Vec<KernelTime> = totals.into_iter().map(|(kernel, (dispatches, ms))| KernelTime { kernel, dispatches, ms }).collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(out)
    }

    /// Runs `f` (which records dispatches and copies) and returns the GPU time from the start of the first
    /// compute pass, opened before `f` records anything, to the end of the last, in ms; waits for it. None where
    /// the adapter has no TIMESTAMP_QUERY, `f` submitted on its own or opened more than 64 passes (then only wall
    /// time around a fence can tell), or under profiling.
    pub fn gpu_time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<Option<f64>> {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) || self.profiling() {
            f()?;
            self.sync()?;
            return Ok(None);
        }
        self.flush()?;
        let submits = {
            let mut st = self.lock();
            if st.query_set.is_none() {
                st.query_set = Some(self.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("kiln timestamps"), ty: wgpu::QueryType::Timestamp, count: 2 * TIMED_PASSES }));
            }
            st.timestamps_armed = true;
            st.timed_passes = 0;
            // A pass opened now starts the span before anything `f` records (copies included).
            self.open_pass(&mut st);
            st.stats.submits
        };
        let ran = f();
        let bytes = 16 * TIMED_PASSES as u64;
        let usage = |u| wgpu::BufferDescriptor { label: Some("kiln timestamps"), size: bytes, usage: u, mapped_at_creation: false };
        let resolved = self.device.create_buffer(&usage(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC));
        let readback = self.device.create_buffer(&usage(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST));
        let (timed, passes) = {
            let mut st = self.lock();
            let passes = std::mem::take(&mut st.timed_passes);
            let timed = st.timestamps_armed && passes > 0 && st.stats.submits == submits;
            st.timestamps_armed = false;
            Self::end_pass(&mut st);
            if timed {
                let qs = st.query_set.clone().expect("created above");
                let enc = self.encoder(&mut st);
                enc.resolve_query_set(&qs, 0..2 * passes, &resolved, 0);
                enc.copy_buffer_to_buffer(&resolved, 0, &readback, 0, 16 * passes as u64);
            }
            (timed, passes as usize)
        };
        self.sync()?;
        ran?;
        if !timed {
            return Ok(None);
        }
        let ticks = self.read_timestamps(&readback)?;
        let ns = ticks[2 * passes - 1].saturating_sub(ticks[0]) as f64 * self.queue.get_timestamp_period() as f64;
        Ok(Some(ns / 1e6))
    }
}
