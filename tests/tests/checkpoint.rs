//! Checkpoints: safetensors round trip, corrupt files as errors (a randomized fuzz of the reader), atomic
//! writes, resume = uninterrupted, frozen parameters bit-identical, eval of a saved model.

use kiln_models::{evaluate_checkpoint, run, TrainConfig};
use kiln_nn::checkpoint::{self, Checkpoint, NamedTensor};
use kiln_tests::{require_gpu, test_rng};

fn sample() -> Checkpoint {
    let mut ck = Checkpoint::default();
    ck.tensors.push(NamedTensor { name: "conv1.weight".into(), shape: vec![2, 1, 3, 3], data: (0..18).map(|i| i as f32 * 0.5 - 3.0).collect() });
    ck.tensors.push(NamedTensor { name: "conv1.bias".into(), shape: vec![2], data: vec![1.5, -2.25] });
    ck.metadata.insert("kiln.model".into(), "test".into());
    ck
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-ck-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn safetensors_round_trip_and_layout() {
    let ck = sample();
    let bytes = checkpoint::to_bytes(&ck);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header padded to 8 bytes");
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["conv1.weight"]["shape"], serde_json::json!([2, 1, 3, 3]));
    assert_eq!(header["conv1.weight"]["dtype"], "F32");
    assert_eq!(checkpoint::from_bytes("mem", &bytes).unwrap(), ck);
}

#[test]
fn corrupt_checkpoints_are_errors_naming_the_file() {
    let bytes = checkpoint::to_bytes(&sample());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated data", bytes[..bytes.len() - 5].to_vec()),
        ("header longer than file", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        }),
        ("not json", {
            let mut b = bytes.clone();
            b[8] = b'#';
            b
        }),
    ];
    for (what, b) in cases {
        let e = checkpoint::from_bytes("ck.safetensors", &b).expect_err(what).to_string();
        assert!(e.contains("ck.safetensors"), "{what}: {e}");
    }
}

#[test]
fn fuzz_checkpoint_and_idx_readers_never_panic() {
    // A seeded fuzz: random truncations and byte flips of valid files must give Ok or Err, never a panic.
    let mut rng = test_rng("fuzz_readers");
    let ck_bytes = checkpoint::to_bytes(&sample());
    let mut idx = vec![0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 3];
    idx.extend((0..18).map(|i| i as u8));
    for _ in 0..3000 {
        for base in [&ck_bytes, &idx] {
            let mut b = base.clone();
            match rng.below(3) {
                0 => b.truncate(rng.below(b.len() + 1)),
                1 => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(b.len());
                        b[i] = rng.below(256) as u8;
                    }
                }
                _ => b.extend((0..rng.below(16)).map(|_| rng.below(256) as u8)),
            }
            let _ = checkpoint::from_bytes("fuzz", &b);
            let _ = kiln_data::parse_idx("fuzz", &b);
        }
    }
}

#[test]
fn writes_are_atomic_and_leave_no_temporary() {
    let dir = temp_dir("atomic");
    let path = dir.join("last.safetensors");
    checkpoint::save(&path, &sample()).unwrap();
    let mut second = sample();
    second.tensors[1].data = vec![9.0, 9.0];
    checkpoint::save(&path, &second).unwrap();
    assert_eq!(checkpoint::load(&path).unwrap(), second);
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec!["last.safetensors".to_string()]);
}

fn weights(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    checkpoint::load(path).unwrap().tensors.into_iter().map(|t| (t.name, t.data)).collect()
}

#[test]
fn resumed_run_ends_with_the_same_weights() {
    require_gpu();
    let (a, b) = (temp_dir("full"), temp_dir("resumed"));
    let cfg = |dir: &std::path::Path, epochs| TrainConfig { epochs: Some(epochs), out_dir: Some(dir.to_path_buf()), ..TrainConfig::new("mlp", "digits") };
    run(&cfg(&a, 3), |_| {}).unwrap();
    run(&cfg(&b, 2), |_| {}).unwrap(); // "interrupted" after two epochs
                                       // Another batch size would skip other batches: refused, naming the setting.
    let err = run(&TrainConfig { resume: true, batch_size: Some(16), ..cfg(&b, 3) }, |_| {}).expect_err("another batch size").to_string();
    assert!(err.contains("kiln.batch_size") && err.contains("32") && err.contains("16"), "{err}");
    let resumed = run(&TrainConfig { resume: true, ..cfg(&b, 3) }, |_| {}).unwrap();
    assert_eq!(resumed.history.len(), 1, "the resumed run trains only the missing epoch");
    assert_eq!(weights(&a.join("last.safetensors")), weights(&b.join("last.safetensors")));
    assert_eq!(std::fs::read_to_string(b.join("metrics.csv")).unwrap().lines().count(), 4, "metrics.csv continues");
}

#[test]
fn resumed_run_with_augmentation_ends_with_the_same_weights() {
    // Augmentation is seeded by the step number, which a resumed run continues (it used to start again at 0,
    // so the resumed epochs drew other shifts and rotations and every tensor ended different).
    require_gpu();
    let (a, b) = (temp_dir("aug-full"), temp_dir("aug-resumed"));
    let augment = kiln_graph::Augment { shift: 2, rotation: 10f32.to_radians(), ..Default::default() };
    let cfg =
        |dir: &std::path::Path, epochs| TrainConfig { epochs: Some(epochs), train_limit: Some(256), augment: Some(augment), out_dir: Some(dir.to_path_buf()), ..TrainConfig::new("lenet", "digits") };
    run(&cfg(&a, 2), |_| {}).unwrap();
    run(&cfg(&b, 1), |_| {}).unwrap();
    let resumed = run(&TrainConfig { resume: true, ..cfg(&b, 2) }, |_| {}).unwrap();
    assert_eq!(resumed.history.len(), 1);
    assert_eq!(weights(&a.join("last.safetensors")), weights(&b.join("last.safetensors")));
}

#[test]
fn frozen_parameters_stay_bit_identical_and_eval_matches() {
    require_gpu();
    let (src, dst) = (temp_dir("src"), temp_dir("dst"));
    let small = |dir: &std::path::Path| TrainConfig { epochs: Some(2), train_limit: Some(512), out_dir: Some(dir.to_path_buf()), ..TrainConfig::new("lenet", "digits") };
    run(&small(&src), |_| {}).unwrap();
    let r = run(&TrainConfig { from: Some(src.join("last.safetensors")), freeze: vec!["features".into()], ..small(&dst) }, |_| {}).unwrap();
    assert_eq!(r.frozen, vec!["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]);
    let (before, after) = (weights(&src.join("last.safetensors")), weights(&dst.join("last.safetensors")));
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        if name.starts_with("features") {
            assert_eq!(a, b, "{name} changed while frozen");
        } else {
            assert_ne!(a, b, "{name} should have trained");
        }
    }
    let e = evaluate_checkpoint(&dst.join("last.safetensors"), None, None).unwrap();
    assert_eq!(e.test.test_accuracy, r.test.test_accuracy, "eval of the saved model must reproduce the run's test accuracy");
}

#[test]
fn batch_norm_counts_its_batches_as_an_int64_scalar_like_torchvision() {
    require_gpu();
    use kiln_nn::{BatchNorm, Layer, Module};
    let mut vs = kiln_nn::VarStore::new(1);
    let mut bn = BatchNorm::new(&mut vs, "bn1", 3).unwrap();
    vs.finish().unwrap();
    let x = kiln_graph::Tensor::randn(&[4, 3, 2, 2], 1.0, &mut kiln_graph::Rng::new(2)).unwrap();
    bn.forward(&x).unwrap();
    bn.forward(&x).unwrap();
    bn.set_training(false);
    bn.forward(&x).unwrap(); // evaluation does not count
    let ck = vs.to_checkpoint().unwrap();
    assert_eq!(ck.int64, [checkpoint::NamedInts { name: "bn1.num_batches_tracked".into(), shape: vec![], data: vec![2] }]);
    // Written as safetensors' I64 with an empty shape, as torch.save of a state_dict then safetensors has it.
    let bytes = checkpoint::to_bytes(&ck);
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header["bn1.num_batches_tracked"]["dtype"], "I64");
    assert_eq!(header["bn1.num_batches_tracked"]["shape"], serde_json::json!([]));
    let back = checkpoint::from_bytes("bn.safetensors", &bytes).unwrap();
    assert_eq!(back, ck);
    // A fresh model loads the count with the statistics.
    let mut fresh = kiln_nn::VarStore::new(9);
    let other = BatchNorm::new(&mut fresh, "bn1", 3).unwrap();
    fresh.finish().unwrap();
    let loaded = fresh.load_checkpoint("bn.safetensors", &back, true, |_| true).unwrap();
    assert!(loaded.contains(&"bn1.num_batches_tracked".to_string()), "{loaded:?}");
    assert_eq!(other.num_batches_tracked.load(std::sync::atomic::Ordering::Relaxed), 2);
    // Other dtypes are errors naming the tensor and the dtype.
    let mut f16 = bytes.clone();
    let at = f16.windows(5).position(|w| w == b"\"I64\"").unwrap();
    f16[at..at + 5].copy_from_slice(b"\"F16\"");
    let err = checkpoint::from_bytes("bn.safetensors", &f16).unwrap_err().to_string();
    assert!(err.contains("bn1.num_batches_tracked") && err.contains("F16"), "{err}");
}
