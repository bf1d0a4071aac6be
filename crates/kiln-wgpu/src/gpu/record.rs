//! Recording: shader modules, layouts and pipelines (cached), bind groups (cached), the open compute pass,
//! dispatches, copies, and the flush that submits them.

use super::*;

#[derive(Hash, PartialEq, Eq, Clone)]
pub(super) struct PipelineKey {
    pub(super) shader: usize,
    pub(super) entry: &'static str,
    pub(super) constants: Vec<(&'static str, u64)>,
    pub(super) inputs: usize,
    pub(super) outputs: usize,
    pub(super) textures: usize,
}

/// Bindings after the params: read-only storage buffers, read-write ones, textures.
pub(super) type LayoutKey = (usize, usize, usize);

impl PipelineKey {
    fn layout(&self) -> LayoutKey {
        (self.inputs, self.outputs, self.textures)
    }
}

#[derive(Hash, PartialEq, Eq)]
pub(super) struct BindKey {
    pub(super) layout: LayoutKey,
    /// (buffer, offset, size) per storage binding, in binding order.
    pub(super) ranges: Vec<(wgpu::Buffer, u64, u64)>,
    pub(super) textures: Vec<wgpu::Texture>,
}

pub(super) fn pad16(params: &[u8]) -> Vec<u8> {
    let mut p = params.to_vec();
    let len = p.len().max(16).div_ceil(16) * 16;
    p.resize(len, 0);
    p
}

impl Gpu {
    pub(super) fn module(&self, st: &mut State, shader: &'static Shader) -> Result<()> {
        if st.modules.contains_key(&shader.key()) {
            return Ok(());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor { label: Some(shader.name), source: wgpu::ShaderSource::Wgsl(shader.source.into()) };
        // Bounds checks stay on; the loop counters wgpu adds against infinite loops in untrusted shaders are
        // dropped: they cost issue slots in every iteration of the hot loops (matmul's k loop) and can keep a
        // driver from unrolling them.
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = shader.loop_checks;
        // SAFETY: bounds checks are always on. Loop counters are dropped only from Kiln's own shaders (`shaders/`,
        // `loop_checks: false`), where every loop ends: each steps by a positive constant (or halves a positive
        // stride) towards a bound taken from its params, never a `loop {}`. Other shaders keep them.
        let m = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader { shader: shader.name.into(), entry: "(module)".into(), message: e.to_string() });
        }
        st.modules.insert(shader.key(), m);
        Ok(())
    }

    pub(super) fn layout(&self, st: &mut State, (inputs, outputs, textures): LayoutKey) {
        st.layouts.entry((inputs, outputs, textures)).or_insert_with(|| {
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: true, min_binding_size: None },
                count: None,
            }];
            for i in 0..inputs + outputs {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: 1 + i as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Storage { read_only: i < inputs }, has_dynamic_offset: false, min_binding_size: None },
                    count: None,
                });
            }
            for i in 0..textures {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: (1 + inputs + outputs + i) as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Texture { sample_type: wgpu::TextureSampleType::Float { filterable: false }, view_dimension: wgpu::TextureViewDimension::D2, multisampled: false },
                    count: None,
                });
            }
            let bgl = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &entries });
            let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor { label: None, bind_group_layouts: &[Some(&bgl)], immediate_size: 0 });
            (bgl, pl)
        });
    }

    /// Creates (once) the pipeline for a dispatch's shader, entry and constants.
    pub(super) fn pipeline(&self, st: &mut State, d: &Dispatch) -> Result<PipelineKey> {
        let key = PipelineKey {
            shader: d.shader.key(),
            entry: d.entry,
            constants: d.constants.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
            inputs: d.inputs.len(),
            outputs: d.outputs.len(),
            textures: d.textures.len(),
        };
        if st.pipelines.contains_key(&key) {
            return Ok(key);
        }
        self.module(st, d.shader)?;
        self.layout(st, key.layout());
        if let Some(dir) = &self.dump_dir {
            self.dump(dir, d)?;
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(d.entry),
            layout: Some(&st.layouts[&key.layout()].1),
            module: &st.modules[&d.shader.key()],
            entry_point: Some(d.entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: d.constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader { shader: d.shader.name.into(), entry: d.entry.into(), message: e.to_string() });
        }
        if self.log {
            eprintln!("[kiln] pipeline {}::{} {:?}", d.shader.name, d.entry, d.constants);
        }
        st.stats.pipelines_created += 1;
        st.pipelines.insert(key.clone(), p);
        Ok(key)
    }

    pub(super) fn dump(&self, dir: &std::path::Path, d: &Dispatch) -> Result<()> {
        let consts: String = d.constants.iter().map(|(n, v)| format!(".{n}={v}")).collect();
        let path = dir.join(format!("{}.{}{}.wgsl", d.shader.name.trim_end_matches(".wgsl"), d.entry, consts));
        let header: String = d.constants.iter().map(|(n, v)| format!("// override {n} = {v}\n")).collect();
        let err = |e: std::io::Error| GpuError::Dump { path: path.display().to_string(), message: e.to_string() };
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::write(&path, format!("// entry point: {}\n{header}{}", d.entry, d.shader.source)).map_err(err)
    }

    pub(super) fn encoder<'s>(&self, st: &'s mut State) -> &'s mut wgpu::CommandEncoder {
        st.encoder.get_or_insert_with(|| self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln step") }))
    }

    /// Opens a compute pass. Under `gpu_time_ms` every pass writes a timestamp when it starts and when it ends
    /// (copies between passes fall inside the span from the first start to the last end).
    pub(super) fn open_pass(&self, st: &mut State) {
        let query_set = if st.timestamps_armed && st.timed_passes < TIMED_PASSES { st.query_set.clone() } else { None };
        let slot = 2 * st.timed_passes;
        let timestamp_writes = query_set.as_ref().map(|qs| wgpu::ComputePassTimestampWrites { query_set: qs, beginning_of_pass_write_index: Some(slot), end_of_pass_write_index: Some(slot + 1) });
        if timestamp_writes.is_some() {
            st.timed_passes += 1;
        } else if st.timestamps_armed {
            // More passes than slots: the span would end too early, so this call reports no time.
            st.timestamps_armed = false;
            st.timed_passes = 0;
        }
        let pass = self.encoder(st).begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
        st.pass = Some(pass.forget_lifetime());
    }

    pub(super) fn end_pass(st: &mut State) {
        st.pass = None;
    }

    /// Records one dispatch into the open compute pass.
    pub fn dispatch(&self, d: &Dispatch) -> Result<()> {
        self.check_bindings(d)?;
        let params = pad16(d.params);
        if params.len() as u64 > PARAMS_WINDOW {
            return Err(GpuError::Validation { context: format!("{}::{}", d.shader.name, d.entry), message: format!("params of {} bytes exceed the {PARAMS_WINDOW}-byte window", params.len()) });
        }
        let align = (self.limits.min_uniform_buffer_offset_alignment as usize).max(16);
        let profiled = self.profiling.load(std::sync::atomic::Ordering::Relaxed) && self.features.contains(wgpu::Features::TIMESTAMP_QUERY);
        let mut st = self.lock();
        // Flush first when the params ring or the profiler's query slots are full, before this dispatch's
        // params take their place in the ring.
        let ring_full = (st.ring_host.len().div_ceil(align) * align) as u64 + PARAMS_WINDOW > RING_BYTES;
        if ring_full || (profiled && st.profile.pending.len() as u32 >= PROFILE_SLOTS) {
            drop(st);
            self.flush()?;
            st = self.lock();
        }
        let key = self.pipeline(&mut st, d)?;
        for v in d.outputs {
            Self::forget_textures(&mut st, v.buffer.serial);
        }
        let offset = st.ring_host.len().div_ceil(align) * align;
        st.ring_host.resize(offset, 0);
        st.ring_host.extend_from_slice(&params);
        let bind_group = self.bind_group(&mut st, &key, d);
        if profiled {
            self.open_profiled_pass(&mut st, d);
        }
        if st.pass.is_none() {
            self.open_pass(&mut st);
        }
        let pipeline = st.pipelines[&key].clone();
        let pass = st.pass.as_mut().expect("pass opened above");
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[offset as u32]);
        let [x, y, z] = d.workgroups;
        if x > 0 && y > 0 && z > 0 {
            pass.dispatch_workgroups(x, y, z);
        }
        if profiled {
            Self::end_pass(&mut st);
        }
        st.stats.dispatches += 1;
        st.recorded_ops += 1;
        bump_thread(|t| t.dispatches += 1);
        Ok(())
    }

    /// Every binding of a dispatch is this device's, within the binding limit and at an aligned offset.
    fn check_bindings(&self, d: &Dispatch) -> Result<()> {
        let limit = self.max_binding_bytes();
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        for v in d.inputs.iter().chain(d.outputs) {
            if v.buffer.device.id != self.id {
                self.check_device(v, &format!("{}::{}", d.shader.name, d.entry))?;
            }
            if v.bytes > limit {
                return Err(GpuError::BindingTooLarge { bytes: v.bytes, limit, what: format!("{}::{}", d.shader.name, d.entry) });
            }
            if v.offset % align != 0 {
                return Err(GpuError::Validation {
                    context: format!("{}::{}", d.shader.name, d.entry),
                    message: format!("a binding at byte offset {} breaks this adapter's min_storage_buffer_offset_alignment of {align}", v.offset),
                });
            }
        }
        if let Some(t) = d.textures.iter().find(|t| t.texture.device_id != self.id) {
            return Err(GpuError::CrossDevice { what: format!("{}::{} (a texture copy)", d.shader.name, d.entry), a: self.describe(), b: format!("device #{}", t.texture.device_id) });
        }
        Ok(())
    }

    /// The bind group of a dispatch's buffers and textures: from the cache, or made and cached.
    fn bind_group(&self, st: &mut State, key: &PipelineKey, d: &Dispatch) -> wgpu::BindGroup {
        let bind_key = BindKey {
            layout: key.layout(),
            ranges: d.inputs.iter().chain(d.outputs).map(|v| (v.buffer.raw().clone(), v.offset, v.bytes.max(4))).collect(),
            textures: d.textures.iter().map(|t| t.texture.raw().0.clone()).collect(),
        };
        if let Some(bg) = st.bind_groups.get(&bind_key) {
            return bg.clone();
        }
        let mut entries =
            vec![wgpu::BindGroupEntry { binding: 0, resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &st.ring, offset: 0, size: wgpu::BufferSize::new(PARAMS_WINDOW) }) }];
        for (i, (buffer, offset, bytes)) in bind_key.ranges.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: 1 + i as u32, resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer, offset: *offset, size: wgpu::BufferSize::new(*bytes) }) });
        }
        let first_texture = 1 + bind_key.ranges.len() as u32;
        for (i, t) in d.textures.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: first_texture + i as u32, resource: wgpu::BindingResource::TextureView(&t.texture.raw().1) });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &st.layouts[&key.layout()].0, entries: &entries });
        if st.bind_groups.len() >= BIND_GROUP_CACHE {
            st.bind_groups.clear();
        }
        st.bind_groups.insert(bind_key, bg.clone());
        st.stats.bind_groups_created += 1;
        bump_thread(|t| t.bind_groups_created += 1);
        bg
    }

    /// Under profiling, each dispatch gets a pass of its own with timestamps at its start and end (the
    /// dispatch flushed first when the query slots were full).
    fn open_profiled_pass(&self, st: &mut State, d: &Dispatch) {
        Self::end_pass(st);
        if st.profile.query_set.is_none() {
            st.profile.query_set = Some(self.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("kiln profile"), ty: wgpu::QueryType::Timestamp, count: 2 * PROFILE_SLOTS }));
        }
        let slot = 2 * st.profile.pending.len() as u32;
        let consts: String = d.constants.iter().map(|(n, v)| format!(" {n}={v}")).collect();
        st.profile.pending.push(format!("{}::{}{consts}", d.shader.name.trim_end_matches(".wgsl"), d.entry));
        let qs = st.profile.query_set.clone().expect("created above");
        let writes = wgpu::ComputePassTimestampWrites { query_set: &qs, beginning_of_pass_write_index: Some(slot), end_of_pass_write_index: Some(slot + 1) };
        let pass = self.encoder(st).begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: Some(writes) });
        st.pass = Some(pass.forget_lifetime());
    }

    /// Records a buffer-to-buffer copy (sizes and offsets multiples of 4).
    pub fn copy(&self, src: &BufView, dst: &BufView, bytes: u64) -> Result<()> {
        self.check_device(src, "a copy's source")?;
        self.check_device(dst, "a copy's destination")?;
        let mut st = self.lock();
        Self::forget_textures(&mut st, dst.buffer.serial);
        Self::end_pass(&mut st);
        self.encoder(&mut st).copy_buffer_to_buffer(src.buffer.raw(), src.offset, dst.buffer.raw(), dst.offset, bytes);
        st.recorded_ops += 1;
        Ok(())
    }

    /// Records a fill with zeros.
    pub fn zero(&self, view: &BufView) -> Result<()> {
        self.check_device(view, "a fill")?;
        let mut st = self.lock();
        Self::forget_textures(&mut st, view.buffer.serial);
        Self::end_pass(&mut st);
        self.encoder(&mut st).clear_buffer(view.buffer.raw(), view.offset, Some(view.bytes.div_ceil(4) * 4));
        st.recorded_ops += 1;
        Ok(())
    }

    /// Finishes and submits the open recording (if any). Returns the submission index.
    pub fn flush(&self) -> Result<Option<wgpu::SubmissionIndex>> {
        let mut st = self.lock();
        Self::end_pass(&mut st);
        let profiled = std::mem::take(&mut st.profile.pending);
        let mut profile_readback = None;
        if !profiled.is_empty() {
            let n = 2 * profiled.len() as u64;
            let usage = |u| wgpu::BufferDescriptor { label: Some("kiln profile"), size: 8 * n, usage: u, mapped_at_creation: false };
            let resolved = self.device.create_buffer(&usage(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC));
            let readback = self.device.create_buffer(&usage(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST));
            let qs = st.profile.query_set.clone().expect("set up by dispatch");
            let enc = self.encoder(&mut st);
            enc.resolve_query_set(&qs, 0..n as u32, &resolved, 0);
            enc.copy_buffer_to_buffer(&resolved, 0, &readback, 0, 8 * n);
            profile_readback = Some(readback);
        }
        let Some(encoder) = st.encoder.take() else {
            return Ok(None);
        };
        if !st.ring_host.is_empty() {
            self.queue.write_buffer(&st.ring, 0, &st.ring_host);
            st.ring_host.clear();
        }
        let ops = std::mem::take(&mut st.recorded_ops);
        let index = self.queue.submit([encoder.finish()]);
        st.stats.submits += 1;
        count_thread(1, 0, 0);
        for (raw, class, serial) in std::mem::take(&mut st.quarantine) {
            st.pool.entry(class).or_default().insert(serial, raw);
        }
        drop(st);
        if self.log {
            eprintln!("[kiln] submit: {ops} recorded commands");
        }
        self.check_errors(&format!("a submit of {ops} commands"))?;
        if let Some(readback) = profile_readback {
            self.collect_profile(&readback, profiled)?;
        }
        Ok(Some(index))
    }
}
