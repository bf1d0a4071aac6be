//! Adapter choice: best adapter by default (discrete > integrated > virtual > CPU), or the one the user names.

use crate::error::{GpuError, Result};

/// One adapter as `kiln info` shows it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub features: Vec<String>,
    pub limits: Vec<(String, u64)>,
}

/// Features Kiln uses when the adapter has them; none is required.
pub fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::SUBGROUP_BARRIER
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
        | wgpu::Features::IMMEDIATES
}

pub(crate) fn instance() -> wgpu::Instance {
    // Reads WGPU_BACKEND (and the other WGPU_* switches) from the environment.
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

pub(crate) fn enumerate(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// Higher is better: real GPUs first, then software; native APIs before GL (GL's llvmpipe is far slower than lavapipe).
fn rank(info: &wgpu::AdapterInfo) -> (u32, u32) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 1,
        wgpu::DeviceType::Other => 0,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 1,
        _ => 0,
    };
    (kind, api)
}

pub(crate) fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

/// Picks the adapter: `wanted` matches a case-insensitive substring of "name backend" or an index from `kiln info`.
pub(crate) fn choose(adapters: Vec<wgpu::Adapter>, wanted: Option<&str>) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        let backend = std::env::var("WGPU_BACKEND").map(|b| format!(" (WGPU_BACKEND={b})")).unwrap_or_default();
        return Err(GpuError::NoAdapter(backend));
    }
    if let Some(wanted) = wanted.filter(|w| !w.trim().is_empty()) {
        let needle = wanted.trim().to_lowercase();
        let available = adapters.iter().enumerate().map(|(i, a)| format!("[{i}] {}", describe(&a.get_info()))).collect::<Vec<_>>().join(", ");
        let by_index = needle.parse::<usize>().ok().filter(|&i| i < adapters.len());
        let found = match by_index {
            Some(i) => Some(i),
            None => adapters.iter().position(|a| {
                let info = a.get_info();
                format!("{} {:?}", info.name, info.backend).to_lowercase().contains(&needle)
            }),
        };
        return match found {
            Some(i) => Ok(adapters.into_iter().nth(i).expect("index checked above")),
            None => Err(GpuError::AdapterNotFound { wanted: wanted.to_string(), available }),
        };
    }
    let best = adapters.into_iter().max_by_key(|a| rank(&a.get_info())).expect("non-empty checked above");
    Ok(best)
}

pub(crate) fn summarize(index: usize, adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let features = adapter.features();
    let limits = adapter.limits();
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        features: wanted_features().iter_names().filter(|(_, f)| features.contains(*f)).map(|(n, _)| n.to_string()).collect(),
        limits: vec![
            ("max_storage_buffer_binding_size".into(), limits.max_storage_buffer_binding_size),
            ("max_buffer_size".into(), limits.max_buffer_size),
            ("max_storage_buffers_per_shader_stage".into(), limits.max_storage_buffers_per_shader_stage as u64),
            ("max_compute_workgroup_storage_size".into(), limits.max_compute_workgroup_storage_size as u64),
            ("max_compute_invocations_per_workgroup".into(), limits.max_compute_invocations_per_workgroup as u64),
            ("max_compute_workgroups_per_dimension".into(), limits.max_compute_workgroups_per_dimension as u64),
            ("min_storage_buffer_offset_alignment".into(), limits.min_storage_buffer_offset_alignment as u64),
            ("min_uniform_buffer_offset_alignment".into(), limits.min_uniform_buffer_offset_alignment as u64),
        ],
    }
}

/// Every adapter wgpu can see with the current environment, in `kiln info` order.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = instance();
    enumerate(&instance).iter().enumerate().map(|(i, a)| summarize(i, a)).collect()
}
