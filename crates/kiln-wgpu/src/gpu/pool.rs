//! The buffer pool (size classes, the write-before-dispatch quarantine), buffer views, texture copies, uploads
//! and writes.

use super::*;

/// A pooled GPU buffer. It returns to the pool when dropped.
pub struct PooledBuffer {
    pub(super) raw: Option<wgpu::Buffer>,
    /// The device whose pool the buffer returns to; a live tensor keeps its device open.
    pub(super) device: Device,
    pub(super) class: u64,
    /// Creation order: the pool hands out the oldest free buffer of a class first.
    pub(super) serial: u64,
}

impl PooledBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.raw.as_ref().expect("buffer present until drop")
    }
    pub fn capacity(&self) -> u64 {
        self.class
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// A pooled texture and the view kernels bind.
pub(super) type TextureAndView = (wgpu::Texture, wgpu::TextureView);

/// Texels per row of a `TexView` (4096 floats, 16 KiB: a multiple of the 256-byte copy row alignment).
pub const TEX_ROW_TEXELS: u32 = 1024;

/// A read-only rgba32float copy of a buffer range: float i lies in texel (i / 4 % 1024, i / 4 / 1024), component
/// i % 4. Lavapipe (Mesa's CPU driver) fetches texels with vector gathers but reads storage buffers one lane at a
/// time in a branchy loop: 8x slower per float, measured (docs/how-it-runs.md). Kernels that read an operand
/// many times read it from one of these. Pooled by row count like buffers; cheap to clone.
#[derive(Clone)]
pub struct TexView {
    pub(super) texture: Arc<PooledTexture>,
    /// Floats copied in.
    pub floats: u64,
}

pub struct PooledTexture {
    pub(super) raw: Option<TextureAndView>,
    /// Weak: the device's texture cache holds textures, so a strong handle would keep the device alive forever.
    pub(super) device: Weak<Gpu>,
    pub(super) device_id: u64,
    pub(super) rows: u32,
    pub(super) serial: u64,
}

impl PooledTexture {
    pub(super) fn raw(&self) -> &TextureAndView {
        self.raw.as_ref().expect("a live texture")
    }
}

impl Drop for PooledTexture {
    fn drop(&mut self) {
        if let (Some(raw), Some(gpu)) = (self.raw.take(), self.device.upgrade()) {
            gpu.release_texture(raw, self.rows, self.serial);
        }
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.device.release(raw, self.class, self.serial);
        }
    }
}

/// A byte range of a pooled buffer: what a tensor's storage is. Cheap to clone.
#[derive(Clone)]
pub struct BufView {
    pub buffer: Arc<PooledBuffer>,
    pub offset: u64,
    pub bytes: u64,
}

impl BufView {
    /// A sub-range of this view (offset relative to this view). Offsets that bind to kernels must respect the
    /// adapter's `min_storage_buffer_offset_alignment`; copies only need 4-byte alignment.
    pub fn sub(&self, offset: u64, bytes: u64) -> BufView {
        assert!(offset + bytes <= self.bytes, "sub-view out of range");
        BufView { buffer: self.buffer.clone(), offset: self.offset + offset, bytes }
    }
    pub fn same_buffer(&self, other: &BufView) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }
    /// The device this view's buffer lives on.
    pub fn device(&self) -> &Device {
        &self.buffer.device
    }
}

pub(super) fn size_class(bytes: u64) -> u64 {
    bytes.max(MIN_CLASS).next_power_of_two()
}

impl Gpu {
    /// A buffer of at least `bytes` from the pool (contents undefined). `what` names the tensor for errors.
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<BufView> {
        let bytes = bytes.max(4).div_ceil(4) * 4;
        if bytes > self.limits.max_buffer_size {
            return Err(GpuError::OutOfMemory { requested: bytes, what: what.to_string(), detail: format!("this adapter's max_buffer_size is {} bytes", self.limits.max_buffer_size) });
        }
        let class = size_class(bytes).min(self.limits.max_buffer_size.max(bytes));
        let mut st = self.lock();
        let (serial, raw) = match st.pool.get_mut(&class).and_then(|free| free.pop_first()) {
            Some(b) => b,
            None => {
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: class,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                if let Some(e) = pollster::block_on(scope.pop()) {
                    return Err(GpuError::OutOfMemory { requested: class, what: what.to_string(), detail: format!("{e}; {} bytes already in use", st.stats.live_bytes) });
                }
                st.stats.buffers_created += 1;
                st.stats.bytes_created += class;
                count_thread(0, 1, class);
                st.next_serial += 1;
                (st.next_serial, b)
            }
        };
        st.stats.live_bytes += class;
        bump_thread(|t| t.bytes_handed_out += class);
        st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes + self.texture_bytes());
        Ok(BufView { buffer: Arc::new(PooledBuffer { raw: Some(raw), device: self.handle(), class, serial }), offset: 0, bytes })
    }

    /// Copies `view` (at a 16-byte aligned offset) into a pooled texture for kernels that read it many times
    /// (see `TexView`). A last partial texel is copied whole from the buffer's spare bytes (its tail is garbage
    /// the kernels never read); a view without them is an error. The copy is recorded in the open command stream.
    pub fn texture_of(&self, view: &BufView, what: &str) -> Result<TexView> {
        self.check_device(view, what)?;
        let texels = view.bytes.div_ceil(16);
        let rows = texels.div_ceil(TEX_ROW_TEXELS as u64).max(1);
        if !view.offset.is_multiple_of(16) || view.offset + 16 * texels > view.buffer.capacity() {
            return Err(GpuError::Validation {
                context: format!("texture copy of {what}"),
                message: format!(
                    "{} bytes at byte offset {} of a {}-byte buffer: the offset must be a multiple of 16 and the last texel within the buffer",
                    view.bytes,
                    view.offset,
                    view.buffer.capacity()
                ),
            });
        }
        if rows > self.limits.max_texture_dimension_2d as u64 {
            return Err(GpuError::BindingTooLarge { bytes: view.bytes, limit: self.limits.max_texture_dimension_2d as u64 * TEX_ROW_TEXELS as u64 * 16, what: format!("texture copy of {what}") });
        }
        let class = (rows as u32).next_power_of_two().min(self.limits.max_texture_dimension_2d);
        let bytes = class as u64 * TEX_ROW_TEXELS as u64 * 16;
        let mut st = self.lock();
        let key = (view.buffer.serial, view.offset, view.bytes);
        if let Some(t) = st.texture_cache.get(&key) {
            return Ok(t.clone());
        }
        for (rows, serial, raw) in std::mem::take(&mut *self.returned_textures.lock().unwrap_or_else(|e| e.into_inner())) {
            st.texture_pool.entry(rows).or_default().insert(serial, raw);
        }
        let (serial, raw) = match st.texture_pool.get_mut(&class).and_then(|free| free.pop_first()) {
            Some(t) => t,
            None => {
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let texture = self.device.create_texture(&wgpu::TextureDescriptor {
                    label: Some("kiln operand texture"),
                    size: wgpu::Extent3d { width: TEX_ROW_TEXELS, height: class, depth_or_array_layers: 1 },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgpu::TextureDimension::D2,
                    format: wgpu::TextureFormat::Rgba32Float,
                    usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                    view_formats: &[],
                });
                if let Some(e) = pollster::block_on(scope.pop()) {
                    return Err(GpuError::OutOfMemory {
                        requested: bytes,
                        what: format!("texture copy of {what}"),
                        detail: format!("{e}; {} bytes already in use", st.stats.live_bytes + self.texture_bytes()),
                    });
                }
                let tv = texture.create_view(&wgpu::TextureViewDescriptor::default());
                st.stats.buffers_created += 1;
                st.stats.bytes_created += bytes;
                count_thread(0, 1, bytes);
                st.next_serial += 1;
                (st.next_serial, (texture, tv))
            }
        };
        let textures = self.texture_live_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
        bump_thread(|t| t.bytes_handed_out += bytes);
        st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes + textures);
        Self::end_pass(&mut st);
        let row_bytes = TEX_ROW_TEXELS as u64 * 16;
        let (full_rows, tail) = (texels / TEX_ROW_TEXELS as u64, texels % TEX_ROW_TEXELS as u64);
        let enc = self.encoder(&mut st);
        let mut copy = |offset: u64, y: u64, width: u64, height: u64| {
            enc.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo { buffer: view.buffer.raw(), layout: wgpu::TexelCopyBufferLayout { offset, bytes_per_row: Some(row_bytes as u32), rows_per_image: None } },
                wgpu::TexelCopyTextureInfo { texture: &raw.0, mip_level: 0, origin: wgpu::Origin3d { x: 0, y: y as u32, z: 0 }, aspect: wgpu::TextureAspect::All },
                wgpu::Extent3d { width: width as u32, height: height as u32, depth_or_array_layers: 1 },
            );
        };
        if view.offset + rows * row_bytes <= view.buffer.capacity() {
            // One copy of whole rows where the buffer has the room (its spare bytes land past the view's floats).
            copy(view.offset, 0, TEX_ROW_TEXELS as u64, rows);
        } else {
            if full_rows > 0 {
                copy(view.offset, 0, TEX_ROW_TEXELS as u64, full_rows);
            }
            if tail > 0 {
                copy(view.offset + full_rows * row_bytes, full_rows, tail, 1);
            }
        }
        st.recorded_ops += 1;
        let t = TexView { texture: Arc::new(PooledTexture { raw: Some(raw), device: self.me.clone(), device_id: self.id, rows: class, serial }), floats: view.bytes / 4 };
        if st.texture_cache.len() >= TEXTURE_CACHE {
            st.texture_cache.clear();
        }
        st.texture_cache.insert(key, t.clone());
        Ok(t)
    }

    /// Drops the texture copies of a buffer that is about to change (or to be freed).
    pub(super) fn forget_textures(st: &mut State, buffer_serial: u64) {
        if !st.texture_cache.is_empty() {
            st.texture_cache.retain(|k, _| k.0 != buffer_serial);
        }
    }

    /// A texture's drop: never locks `state` (see `returned_textures`).
    pub(super) fn release_texture(&self, raw: TextureAndView, rows: u32, serial: u64) {
        self.texture_live_bytes.fetch_sub(rows as u64 * TEX_ROW_TEXELS as u64 * 16, std::sync::atomic::Ordering::Relaxed);
        self.returned_textures.lock().unwrap_or_else(|e| e.into_inner()).push((rows, serial, raw));
    }

    pub(super) fn release(&self, raw: wgpu::Buffer, class: u64, serial: u64) {
        let mut st = self.lock();
        Self::forget_textures(&mut st, serial);
        st.stats.live_bytes = st.stats.live_bytes.saturating_sub(class);
        if st.encoder.is_some() {
            st.quarantine.push((raw, class, serial));
        } else {
            st.pool.entry(class).or_default().insert(serial, raw);
        }
    }

    /// Uploads bytes into a fresh pooled buffer. Pool buffers are never read by pending work (see `quarantine`),
    /// so the write can be staged on the queue directly.
    pub fn upload(&self, data: &[u8], what: &str) -> Result<BufView> {
        let view = self.alloc(data.len() as u64, what)?;
        self.write_staged(&view, data);
        Ok(view)
    }

    /// Overwrites an existing view with host bytes. Pending dispatches may read it, and a queue write would land
    /// before them, so the open recording is submitted first.
    pub fn write(&self, view: &BufView, data: &[u8]) -> Result<()> {
        self.check_device(view, "a host write")?;
        if data.len() as u64 > view.bytes {
            return Err(GpuError::Readback(format!("write of {} bytes into a view of {} bytes", data.len(), view.bytes)));
        }
        self.flush()?;
        self.write_staged(view, data);
        Ok(())
    }

    pub(super) fn write_staged(&self, view: &BufView, data: &[u8]) {
        Self::forget_textures(&mut self.lock(), view.buffer.serial);
        if data.len().is_multiple_of(4) {
            self.queue.write_buffer(view.buffer.raw(), view.offset, data);
        } else {
            let mut padded = data.to_vec();
            padded.resize(data.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(view.buffer.raw(), view.offset, &padded);
        }
    }
}
