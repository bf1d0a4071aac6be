//! Readback: copying a buffer to a staging buffer and mapping it, blocking or asynchronously; errors and sync.

use super::*;

#[derive(Default)]
pub(super) struct ReadState {
    pub(super) result: Option<std::result::Result<(), String>>,
    pub(super) waker: Option<std::task::Waker>,
}

/// A readback in flight.
pub struct Readback {
    pub(super) gpu: Device,
    pub(super) staging: Option<wgpu::Buffer>,
    pub(super) class: u64,
    pub(super) bytes: u64,
    pub(super) done: Arc<Mutex<ReadState>>,
}

impl Readback {
    fn take_result(&self) -> Option<std::result::Result<(), String>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).result.take()
    }

    fn complete(&mut self, r: std::result::Result<(), String>) -> Result<Vec<u8>> {
        r.map_err(GpuError::Readback)?;
        let staging = self.staging.take().expect("readback completed once");
        self.gpu.finish_read(staging, self.class, self.bytes)
    }

    /// Blocks until the bytes are on the host.
    pub fn wait(mut self) -> Result<Vec<u8>> {
        loop {
            if let Some(r) = self.take_result() {
                return self.complete(r);
            }
            self.gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Poll(e.to_string()))?;
        }
    }

    /// Non-blocking check: `Some(bytes)` once the copy has landed. Drives the device with a non-blocking poll.
    pub fn try_get(&mut self) -> Option<Result<Vec<u8>>> {
        if let Err(e) = self.gpu.device.poll(wgpu::PollType::Poll) {
            return Some(Err(GpuError::Poll(e.to_string())));
        }
        self.take_result().map(|r| self.complete(r))
    }
}

impl std::future::Future for Readback {
    type Output = Result<Vec<u8>>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        if let Some(r) = self.try_get() {
            return std::task::Poll::Ready(r);
        }
        self.done.lock().unwrap_or_else(|e| e.into_inner()).waker = Some(cx.waker().clone());
        // Native wgpu completes maps only when polled; ask to be polled again (on the web the browser drives it).
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

impl Gpu {
    pub(super) fn check_errors(&self, context: &str) -> Result<()> {
        if let Some(message) = self.uncaptured.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(GpuError::Validation { context: context.into(), message });
        }
        Ok(())
    }

    /// Blocks until all submitted work is done.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Poll(e.to_string()))?;
        Ok(())
    }

    /// Starts reading `view` back: records the copy into a mappable buffer and submits. The returned handle is
    /// completed by [`Readback::wait`] (blocking) or by awaiting it (it is a `Future`).
    pub fn read_start(&self, view: &BufView) -> Result<Readback> {
        self.check_device(view, "a readback")?;
        let bytes = view.bytes.div_ceil(4) * 4;
        let class = size_class(bytes);
        let staging = {
            let mut st = self.lock();
            let b = match st.readback_pool.get_mut(&class).and_then(Vec::pop) {
                Some(b) => b,
                None => {
                    st.stats.buffers_created += 1;
                    st.stats.bytes_created += class;
                    count_thread(0, 1, class);
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("kiln readback"),
                        size: class,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                }
            };
            Self::end_pass(&mut st);
            self.encoder(&mut st).copy_buffer_to_buffer(view.buffer.raw(), view.offset, &b, 0, bytes);
            st.recorded_ops += 1;
            b
        };
        self.flush()?;
        let done = Arc::new(Mutex::new(ReadState::default()));
        let sink = done.clone();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
            s.result = Some(r.map_err(|e| e.to_string()));
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        });
        Ok(Readback { gpu: self.handle(), staging: Some(staging), class, bytes: view.bytes, done })
    }

    /// Blocking read of a view's bytes.
    pub fn read(&self, view: &BufView) -> Result<Vec<u8>> {
        self.read_start(view)?.wait()
    }

    pub(super) fn finish_read(&self, staging: wgpu::Buffer, class: u64, bytes: u64) -> Result<Vec<u8>> {
        let out = {
            let range = staging.get_mapped_range(0..bytes.div_ceil(4) * 4).map_err(|e| GpuError::Readback(e.to_string()))?;
            range[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.lock().readback_pool.entry(class).or_default().push(staging);
        Ok(out)
    }
}
