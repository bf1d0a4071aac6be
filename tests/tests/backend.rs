//! kiln-wgpu behaviour: the buffer pool's write hazard, allocation-free steady state, async readback, limits
//! and broken shaders as errors.

use kiln_graph::backend::{gpu, Dispatch, Shader};
use kiln_graph::Tensor;
use kiln_tests::{require_gpu, test_rng};

#[test]
fn freed_buffers_are_not_overwritten_before_pending_dispatches_run() {
    require_gpu();
    let mut rng = test_rng("pool_hazard");
    let mut pending = Vec::new();
    // Inside one recording: make x, record y = 2x, drop x, and upload new data of the same size. If the pool
    // handed x's buffer back for the upload, the queue write would land before y's dispatch and y would be wrong.
    for _ in 0..50 {
        let xs: Vec<f32> = (0..1000).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        let x = Tensor::from_slice(&xs, &[1000]).unwrap();
        let y = x.scale(2.0).unwrap();
        drop(x);
        let other = Tensor::from_slice(&vec![777.0; 1000], &[1000]).unwrap();
        pending.push((xs, y, other));
    }
    for (xs, y, other) in pending {
        let got = y.to_vec().unwrap();
        assert!(got.iter().zip(&xs).all(|(g, x)| *g == 2.0 * x), "a pending dispatch read data written after it was recorded");
        assert!(other.to_vec().unwrap().iter().all(|&v| v == 777.0));
    }
}

#[test]
fn repeated_work_allocates_nothing_after_warm_up() {
    let g = require_gpu();
    let step = || {
        let a = Tensor::from_slice(&vec![0.5; 64 * 33], &[64, 33]).unwrap().var();
        let w = Tensor::from_slice(&vec![0.25; 33 * 10], &[33, 10]).unwrap().var();
        let loss = a.matmul(&w).unwrap().relu().unwrap().log_softmax(1).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let _ = grads.get(&w).unwrap().to_vec().unwrap();
    };
    step();
    step();
    // Other tests share the GPU in parallel threads, so look for one clean window among a few tries.
    let clean = (0..5).any(|_| {
        let before = g.stats().buffers_created;
        step();
        g.stats().buffers_created == before
    });
    assert!(clean, "the same step kept creating GPU buffers");
}

#[test]
fn async_readback_matches_blocking_readback() {
    require_gpu();
    let x = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5]).unwrap().exp().unwrap();
    let fut = x.to_vec_async().unwrap();
    let a = pollster::block_on(fut).unwrap();
    assert_eq!(a, x.to_vec().unwrap());
}

#[test]
fn tensor_over_binding_limit_is_a_clear_error() {
    let g = require_gpu();
    let limit = g.max_binding_bytes();
    let n = (limit / 4 + 1) as usize;
    let err = Tensor::zeros(&[n]).expect_err("a tensor over max_storage_buffer_binding_size must be an error");
    let msg = err.to_string();
    assert!(msg.contains("max_storage_buffer_binding_size") && msg.contains(&limit.to_string()), "{msg}");
}

#[test]
fn allocation_beyond_the_device_is_out_of_memory_with_the_size() {
    let g = require_gpu();
    let huge = (g.limits.max_buffer_size / 4 + 1) * 4;
    let err = g.alloc(huge, "test tensor").err().expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains("out of GPU memory") && msg.contains(&huge.to_string()), "{msg}");
}

static BROKEN: Shader = Shader::new("broken_test.wgsl", "@compute @workgroup_size(1) fn main() { let x: f32 = undefined_thing; }");

#[test]
fn broken_shader_is_an_error_naming_it() {
    require_gpu();
    let out = gpu().unwrap().alloc(16, "out").unwrap();
    let err = gpu()
        .unwrap()
        .dispatch(&Dispatch { shader: &BROKEN, entry: "main", constants: &[], params: &[], inputs: &[], outputs: &[&out], textures: &[], workgroups: [1, 1, 1] })
        .expect_err("a shader that does not compile must be an error");
    assert!(err.to_string().contains("broken_test.wgsl"), "{err}");
}

#[test]
fn every_shader_compiles() {
    let g = require_gpu();
    // The subgroup kernels need the feature; lavapipe has it, so on CI every shader is compiled.
    let subgroups = g.features.contains(kiln_graph::backend::wgpu::Features::SUBGROUP);
    let extra: &[&kiln_graph::backend::Shader] = if subgroups { &kiln_graph::kernels::SUBGROUP_SHADERS } else { &[] };
    for s in kiln_graph::kernels::ALL_SHADERS.iter().chain(extra) {
        let scope = g.device().push_error_scope(kiln_graph::backend::wgpu::ErrorFilter::Validation);
        let _ = g.device().create_shader_module(kiln_graph::backend::wgpu::ShaderModuleDescriptor { label: Some(s.name), source: kiln_graph::backend::wgpu::ShaderSource::Wgsl(s.source.into()) });
        if let Some(e) = pollster::block_on(scope.pop()) {
            panic!("{} does not compile: {e}", s.name);
        }
    }
}

#[test]
fn shape_mismatch_names_both_shapes() {
    require_gpu();
    let a = Tensor::zeros(&[2, 3]).unwrap();
    let b = Tensor::zeros(&[4, 5]).unwrap();
    let e = a.matmul(&b).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[2, 3]") && e.contains("[4, 5]"), "{e}");
    let e = a.add(&Tensor::zeros(&[3, 2]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    let e = a.broadcast_add(&Tensor::zeros(&[4]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4]"), "{e}");
    assert!(a.reshape(&[7]).is_err());
    assert!(Tensor::from_slice(&[1.0, 2.0], &[3]).is_err());
}

#[test]
fn batch_parts_share_one_upload() {
    require_gpu();
    let x = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0];
    let labels = [7u32, 1];
    let t = Tensor::upload_together(&[(bytemuck::cast_slice(&x), &[2, 3], kiln_graph::DType::F32), (bytemuck::cast_slice(&labels), &[2], kiln_graph::DType::U32)]).unwrap();
    assert!(t[0].storage().same_buffer(t[1].storage()), "one buffer, one write");
    assert_eq!(t[0].to_vec().unwrap(), x.to_vec());
    assert_eq!(t[1].to_vec_u32().unwrap(), labels.to_vec());
    assert!(Tensor::upload_together(&[(bytemuck::cast_slice(&x), &[4], kiln_graph::DType::F32)]).is_err());
}
