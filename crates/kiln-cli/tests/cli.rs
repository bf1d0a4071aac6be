//! The `kiln` binary as a user meets it: clear errors (never a panic) for bad input, the --json contract,
//! metrics.csv, kernel dumps.

use std::process::{Command, Output};

fn kiln(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run kiln")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let (out, err) = text(o);
    assert!(!o.status.success(), "expected failure; stdout {out}");
    assert!(!err.contains("panicked"), "panicked instead of a clear error: {err}");
    assert!(err.contains(needle), "stderr should mention {needle:?}: {err}");
}

#[test]
fn bogus_adapter_is_a_clear_error() {
    let o = kiln(&["train", "logreg", "--dataset", "iris", "--epochs", "1"], &[("KILN_ADAPTER", "no-such-gpu-9000")]);
    assert_clean_failure(&o, "no adapter matches \"no-such-gpu-9000\"");
    let o = kiln(&["info", "--adapter", "no-such-gpu-9000"], &[]);
    assert_clean_failure(&o, "available:");
}

#[test]
fn nonsensical_settings_are_clear_errors() {
    assert_clean_failure(&kiln(&["train", "mlp", "--batch-size", "0"], &[]), "batch-size");
    assert_clean_failure(&kiln(&["train", "mlp", "--lr", "-0.1"], &[]), "positive");
    assert_clean_failure(&kiln(&["train", "mlp", "--epochs", "0"], &[]), "epochs");
    assert_clean_failure(&kiln(&["train", "transformer9000"], &[]), "transformer9000");
    assert_clean_failure(&kiln(&["train", "mlp", "--dataset", "imagenet"], &[]), "imagenet");
    assert_clean_failure(&kiln(&["train", "mlp", "--optimizer", "magic"], &[]), "unknown optimizer");
    assert_clean_failure(&kiln(&["train", "mlp", "--schedule", "wobble"], &[]), "unknown schedule");
    assert_clean_failure(&kiln(&["train", "mlp", "--hidden", "64,0"], &[]), "hidden");
}

#[test]
fn help_lists_models_and_data_sets() {
    let (out, _) = text(&kiln(&["train", "--help"], &[]));
    for name in
        ["linreg", "polyreg", "logreg", "softmax", "mlp", "digits", "breast-cancer", "iris", "diabetes", "--epochs", "--batch-size", "--lr", "--optimizer", "--seed", "--adapter", "--out", "--json"]
    {
        assert!(out.contains(name), "help lacks {name}:\n{out}");
    }
}

#[test]
fn json_line_and_metrics_csv() {
    let dir = temp_dir("json");
    let o = kiln(&["train", "logreg", "--dataset", "iris", "--epochs", "20", "--json", "--out", dir.to_str().unwrap()], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let last = out.lines().last().expect("stdout has lines");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"));
    for key in ["model", "dataset", "adapter", "backend", "epochs", "train_loss", "test_accuracy", "seconds", "steps", "submits_per_step"] {
        assert!(v.get(key).is_some(), "JSON lacks {key}: {last}");
    }
    assert_eq!(v["model"], "logreg");
    assert_eq!(v["epochs"], 20);
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 21, "{csv}");
    assert!(csv.starts_with("epoch,train_loss,train_accuracy,dev_loss,dev_accuracy,lr,seconds,samples_per_s"), "{csv}");
    // Regression reports MSE and R^2 instead of accuracy.
    let o = kiln(&["train", "linreg", "--dataset", "diabetes", "--epochs", "5", "--json", "--out", dir.to_str().unwrap()], &[]);
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(v.get("test_mse").is_some() && v.get("test_r2").is_some() && v.get("test_accuracy").is_none());
}

#[test]
fn truncated_data_file_names_the_file() {
    let dir = temp_dir("data");
    std::fs::write(dir.join("breast_cancer.csv"), "569,30,malignant,benign\n17.99,10.38\n").unwrap();
    let o = kiln(&["train", "logreg", "--dataset", "breast-cancer", "--data-dir", dir.to_str().unwrap()], &[]);
    assert_clean_failure(&o, "breast_cancer.csv");
}

#[test]
fn kernels_are_dumped_on_request() {
    let dir = temp_dir("dump");
    let out = temp_dir("dump-run");
    let o = kiln(&["train", "logreg", "--dataset", "iris", "--epochs", "1", "--out", out.to_str().unwrap()], &[("KILN_DUMP_WGSL", dir.to_str().unwrap())]);
    assert!(o.status.success(), "{}", text(&o).1);
    let dumped: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(dumped.iter().any(|f| f.starts_with("matmul") && f.contains(".matmul") && f.ends_with(".wgsl")), "{dumped:?}");
}

#[test]
fn info_names_the_chosen_adapter() {
    let o = kiln(&["info"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("Kiln uses:") && out.contains("max_storage_buffer_binding_size"), "{out}");
}

#[test]
fn bench_and_summary_report_json() {
    let dir = temp_dir("bench");
    let path = dir.join("bench.json");
    let o = kiln(&["bench", "--filter", "matmul,step", "--sizes", "40", "--models", "lenet", "--batch", "8", "--json", path.to_str().unwrap()], &[("KILN_AUTOTUNE", "off")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("compute roof") && out.contains("== matmul") && out.contains("== step"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let records = v.as_array().unwrap();
    // The two ceilings first, then every matmul variant on the square and on LeNet's step products.
    assert_eq!((records[0]["family"].as_str(), records[0]["kernel"].as_str()), (Some("roof"), Some("fma")));
    assert_eq!((records[1]["family"].as_str(), records[1]["kernel"].as_str()), (Some("roof"), Some("copy")));
    let square: Vec<_> = records.iter().filter(|r| r["kernel"].as_str().unwrap_or("").starts_with("square 40")).collect();
    assert!(square.len() >= 4, "{square:?}");
    for r in &square {
        assert_eq!(r["valid"], true, "{r}");
        assert!(r["gflops"].as_f64().unwrap() > 0.0 && r["cpu_gflops"].as_f64().unwrap() > 0.0 && r["roof_fraction"].as_f64().unwrap() > 0.0, "{r}");
    }
    let step = records.iter().find(|r| r["family"] == "step").expect("a step record");
    assert_eq!(step["model"], "lenet");
    assert_eq!(step["bytes_allocated_after_first_step"], 0);
    assert_eq!(step["submits_per_step"], 1.0);
    assert_clean_failure(&kiln(&["bench", "--filter", "nonsense"], &[]), "nonsense");
    let (out, _) = text(&kiln(&["summary", "resnet18", "--json"], &[]));
    let s: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(s["params"], 11_689_512);
    assert_clean_failure(&kiln(&["summary", "resnet18", "--input", "3x7"], &[]), "CxHxW");
    assert_clean_failure(&kiln(&["summary", "transformer"], &[]), "unknown architecture");
}

/// The tensors of a checkpoint, by name.
fn tensors(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    kiln_nn::checkpoint::load(path).unwrap_or_else(|e| panic!("{e}")).tensors.into_iter().map(|t| (t.name, t.data)).collect()
}

/// Starts `kiln train` and returns once its resume.safetensors says it is in the middle of epoch 2.
fn start_and_wait_mid_epoch_two(args: &[&str], dir: &std::path::Path) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().expect("start kiln");
    let state = dir.join("resume.safetensors");
    let started = std::time::Instant::now();
    loop {
        if let Ok(ck) = kiln_nn::checkpoint::load(&state) {
            let meta = |k: &str| ck.metadata.get(k).cloned().unwrap_or_default();
            if meta("kiln.epoch") == "1" && meta("kiln.epoch_batches").parse::<usize>().unwrap_or(0) > 0 {
                return child;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("kiln finished ({status}) before it was interrupted: make the run longer");
        }
        assert!(started.elapsed().as_secs() < 120, "no mid-epoch checkpoint of epoch 2 after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn a_run_killed_or_interrupted_mid_epoch_resumes_bit_identically() {
    let run_args = |dir: &std::path::Path| -> Vec<String> {
        ["train", "mlp", "--dataset", "digits", "--epochs", "3", "--checkpoint-every", "0", "--out"].iter().map(|s| s.to_string()).chain([dir.display().to_string()]).collect()
    };
    let full = temp_dir("uninterrupted");
    let args = run_args(&full);
    let o = kiln(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let want = tensors(&full.join("last.safetensors"));
    for (tag, interrupt) in [("killed", "-KILL"), ("ctrl-c", "-INT")] {
        let dir = temp_dir(tag);
        let args = run_args(&dir);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        // A crash (SIGKILL: nothing runs after it) or a Ctrl-C (SIGINT: the run saves, then stops) in epoch 2.
        let child = start_and_wait_mid_epoch_two(&argv, &dir);
        let killed = Command::new("kill").args([interrupt, &child.id().to_string()]).status().expect("kill");
        assert!(killed.success());
        let out = child.wait_with_output().expect("wait");
        assert!(!out.status.success(), "{tag}: the run should not have finished");
        if tag == "ctrl-c" {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("--resume") && err.contains("interrupted in epoch"), "{err}");
        }
        let mut resumed: Vec<&str> = argv.clone();
        resumed.push("--resume");
        let o = kiln(&resumed, &[]);
        assert!(o.status.success(), "{tag}: resume failed: {}", text(&o).1);
        assert_eq!(tensors(&dir.join("last.safetensors")), want, "{tag}: the resumed run's weights differ from the uninterrupted run's");
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let epochs: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
        assert_eq!(epochs, ["1", "2", "3"], "{tag}: metrics.csv has each epoch once: {csv}");
    }
}

#[test]
fn what_a_pytorch_user_needs_predictions_tensor_names_normalisation_and_untrained_weights() {
    // Per-sample predictions from `kiln eval`, consistent with the reported accuracy.
    let dir = temp_dir("predictions");
    let o = kiln(&["train", "softmax", "--dataset", "iris", "--epochs", "30", "--out", dir.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let csv_path = dir.join("predictions.csv");
    let o = kiln(&["eval", "--checkpoint", dir.join("last.safetensors").to_str().unwrap(), "--predictions", csv_path.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("sample,label,predicted,logit_0,logit_1,logit_2,prob_0,prob_1,prob_2"));
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    assert_eq!(rows.len() as u64, report["test_samples"].as_u64().unwrap());
    let mut right = 0;
    for r in &rows {
        let (logits, probs) = (&r[3..6], &r[6..9]);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{r:?}");
        let argmax = (0..3).fold(0, |b, j| if logits[j] > logits[b] { j } else { b });
        assert_eq!(r[2] as usize, argmax, "{r:?}");
        right += (r[1] == r[2]) as usize;
    }
    let acc = report["test_accuracy"].as_f64().unwrap();
    assert!((right as f64 / rows.len() as f64 - acc).abs() < 1e-9, "{right}/{} vs {acc}", rows.len());
    // The input normalisation travels as numbers: one mean and std per iris feature.
    let ck = kiln_nn::checkpoint::load(&dir.join("last.safetensors")).unwrap();
    for key in ["kiln.input_mean", "kiln.input_std"] {
        let values: Vec<f64> = ck.metadata[key].split(',').map(|v| v.parse().unwrap()).collect();
        assert_eq!(values.len(), 4, "{key}: {values:?}");
    }
    // Every tensor's name and shape, as PyTorch's state_dict has them (running statistics included).
    let o = kiln(&["summary", "resnet18", "--params", "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let tensors = v["tensors"].as_array().unwrap();
    assert!(tensors.iter().any(|t| t["name"] == "layer4.1.bn2.running_var" && t["shape"] == serde_json::json!([512])));
    assert!(tensors.iter().any(|t| t["name"] == "fc.weight" && t["shape"] == serde_json::json!([1000, 512])));
    let names: Vec<&str> = tensors.iter().map(|t| t["name"].as_str().unwrap()).collect();
    let at = names.iter().position(|&n| n == "bn1.num_batches_tracked").expect("batch norm's counter is listed");
    assert_eq!(&names[at - 2..=at], ["bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"], "in state_dict order");
    // torchvision's resnet18 state_dict: 62 parameters, 40 running statistics, 20 counters.
    assert_eq!(names.len(), 122);
    assert!(out.contains("conv1.weight"), "the list is printed too");
    // An untrained, seeded model written on request: the same seed, the same weights.
    let (a, b) = (dir.join("lenet-a.safetensors"), dir.join("lenet-b.safetensors"));
    for p in [&a, &b] {
        let o = kiln(&["summary", "lenet", "--classes", "10", "--save", p.to_str().unwrap(), "--seed", "3"], &[]);
        assert!(o.status.success(), "{}", text(&o).1);
    }
    let (ca, cb) = (kiln_nn::checkpoint::load(&a).unwrap(), kiln_nn::checkpoint::load(&b).unwrap());
    assert_eq!(ca.tensors, cb.tensors);
    assert_eq!(ca.get("features.0.weight").unwrap().shape, [6, 1, 5, 5]);
    assert_eq!(ca.metadata["kiln.trained"], "false");
}

#[test]
fn char_rnn_trains_saves_its_vocabulary_and_samples_with_a_seed() {
    let dir = temp_dir("char-rnn");
    let o = kiln(&["train", "char-rnn", "--dataset", "moby-dick", "--steps", "4", "--hidden", "32", "--out", dir.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((r["model"].as_str(), r["steps"].as_u64(), r["held_out_chars"].as_u64()), (Some("char-rnn"), Some(4), Some(20_000)));
    for key in ["held_out_nats_per_char", "held_out_bits_per_char", "unigram_nats_per_char", "five_gram_nats_per_char", "tokens_per_s"] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
    assert!(dir.join("vocab.json").exists() && dir.join("last.safetensors").exists());
    let ck = dir.join("last.safetensors");
    let sample = |prefix: &str, seed: &str| kiln(&["sample", "--checkpoint", ck.to_str().unwrap(), "--prefix", prefix, "--length", "30", "--seed", seed], &[]);
    let (a, b) = (text(&sample("Call me", "5")).0, text(&sample("Call me", "5")).0);
    assert_eq!(a, b, "the same seed, the same text");
    assert!(a.starts_with("Call me") && a.trim_end().chars().count() >= 7, "{a}");
    assert_clean_failure(&sample("Call me \u{1F40B}", "5"), "not in the vocabulary");
    // A checkpoint without its vocabulary, and one of another model, are errors naming the problem.
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    assert_clean_failure(&sample("Call me", "5"), "vocab.json");
    let other = temp_dir("char-rnn-other");
    let o = kiln(&["train", "logreg", "--dataset", "iris", "--epochs", "1", "--out", other.to_str().unwrap()], &[]);
    assert!(o.status.success());
    assert_clean_failure(&kiln(&["sample", "--checkpoint", other.join("last.safetensors").to_str().unwrap()], &[]), "not a char-rnn, names or char-transformer checkpoint");
    assert_clean_failure(&kiln(&["train", "char-rnn", "--dataset", "iris"], &[]), "char-rnn and char-transformer train on moby-dick");
    // Truncated BPTT: the held-out text is read as one stream.
    let tb = temp_dir("char-rnn-tbptt");
    let o = kiln(&["train", "char-rnn", "--dataset", "moby-dick", "--steps", "3", "--hidden", "16", "--tbptt", "--out", tb.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((r["evaluation"].as_str(), r["steps"].as_u64()), (Some("stream"), Some(3)), "{r}");
}

#[test]
fn char_transformer_trains_saves_and_samples() {
    let dir = temp_dir("char-transformer");
    let o = kiln(&["train", "char-transformer", "--dataset", "moby-dick", "--steps", "3", "--hidden", "32", "--out", dir.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((r["model"].as_str(), r["steps"].as_u64()), (Some("char-transformer"), Some(3)));
    assert_eq!((r["shape"]["d_model"].as_u64(), r["shape"]["layers"].as_u64(), r["shape"]["max_len"].as_u64()), (Some(32), Some(1), Some(64)), "{r}");
    assert!(r["held_out_nats_per_char"].as_f64().is_some_and(|v| v > 0.0) && r["five_gram_nats_per_char"].as_f64().is_some());
    let ck = dir.join("last.safetensors");
    let sample = || text(&kiln(&["sample", "--checkpoint", ck.to_str().unwrap(), "--prefix", "Call me", "--length", "80", "--seed", "2"], &[])).0;
    let a = sample();
    assert_eq!(a, sample(), "the same seed, the same text");
    // 80 characters after a 7-character prefix: more than the 64 positions, so sampling slides its window.
    assert!(a.starts_with("Call me") && a.trim_end_matches('\n').chars().count() == 87, "{a:?}");
    assert_clean_failure(&kiln(&["train", "char-transformer", "--dataset", "moby-dick", "--cell", "gru"], &[]), "no cell");
    assert_clean_failure(&kiln(&["train", "char-transformer", "--dataset", "moby-dick", "--tbptt"], &[]), "no state");
}

#[test]
fn names_trains_reports_novelty_and_samples_names() {
    let dir = temp_dir("names");
    let o = kiln(&["train", "names", "--dataset", "names", "--steps", "3", "--hidden", "16", "--out", dir.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((r["model"].as_str(), r["steps"].as_u64(), r["samples"].as_u64()), (Some("names"), Some(3), Some(1000)));
    assert!(r["train_names"].as_u64().unwrap() > 7000 && r["held_out_names"].as_u64().unwrap() > 700, "{r}");
    for key in ["held_out_nats_per_char", "trigram_nats_per_char", "new_share", "distinct_share"] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
    let ck = dir.join("last.safetensors");
    let sample = |seed: &str| text(&kiln(&["sample", "--checkpoint", ck.to_str().unwrap(), "--count", "5", "--seed", seed], &[])).0;
    let a = sample("4");
    assert_eq!(a, sample("4"), "the same seed, the same names");
    assert_eq!(a.lines().count(), 5, "{a}");
    assert_clean_failure(&kiln(&["train", "names", "--dataset", "moby-dick"], &[]), "names on names");
}

#[test]
fn hidden_sizes_parse_and_bad_ones_are_clear_errors() {
    // --hidden used to make clap panic (its parser returned a Vec into a field clap filled value by value).
    let dir = temp_dir("hidden");
    let o = kiln(&["train", "mlp", "--dataset", "iris", "--hidden", "16,8", "--epochs", "1", "--json", "--out", dir.to_str().unwrap()], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["settings"]["hidden"], serde_json::json!([16, 8]));
    assert_clean_failure(&kiln(&["train", "mlp", "--dataset", "iris", "--hidden", "0"], &[]), "--hidden");
}

#[test]
fn captioning_and_vqa_train_on_scenes_and_report() {
    let dir = temp_dir("scenes");
    let o = kiln(&["train", "captioning", "--dataset", "scenes", "--steps", "3", "--out", dir.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((r["steps"].as_u64(), r["test_scenes"].as_u64()), (Some(3), Some(1000)), "{r}");
    assert!(r["bleu4"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)) && r["exact_match"].as_f64().is_some(), "{r}");
    let pictures = std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png")).count();
    assert_eq!(pictures, 4, "four captioned scenes as PNGs");
    let o = kiln(&["train", "vqa", "--dataset", "scenes", "--steps", "3", "--out", dir.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let kinds: Vec<&str> = r["per_kind"].as_array().unwrap().iter().map(|k| k[0].as_str().unwrap()).collect();
    assert_eq!(kinds, ["colour", "shape", "count", "exists", "left-of"], "{r}");
    assert!(r["accuracy"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{r}");
    assert!(out.contains("how many shapes are there ?"), "{out}");
    assert_clean_failure(&kiln(&["train", "vqa", "--dataset", "moby-dick"], &[]), "captioning and vqa on scenes");
    assert_clean_failure(&kiln(&["train", "g2p", "--dataset", "cmudict", "--transformer", "--hidden", "30"], &[]), "multiple of");
}

/// `kiln train segment` (the object-scene models' command) and `kiln style` run end to end with their
/// pictures, and bad input is a clear error. (The two-stage detector's run is tests/rcnn.rs's: untrained, its
/// evaluation of 200 scenes takes minutes on lavapipe.)
#[test]
fn object_scene_training_and_style_transfer_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-objects-{}", std::process::id()));
    let o = kiln(&["train", "segment", "--dataset", "object-scenes", "--steps", "2", "--decoder", "fcn", "--image-size", "48", "--out", dir.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["pixel_accuracy"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)) && r["decoder"] == "Fcn", "{r}");
    assert!(dir.join("scenes.png").exists(), "{out}");
    // Its checkpoint on a picture of one's own.
    let ck = dir.join("segment.safetensors");
    let photo = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/images/astronaut.png");
    let png = dir.join("segments.png");
    let o = kiln(&["segment", "--checkpoint", ck.to_str().unwrap(), photo, "--out", png.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let shares: f64 = v["classes"].as_array().expect("classes").iter().map(|c| c["share"].as_f64().unwrap()).sum();
    assert!(png.exists() && shares <= 1.0 + 1e-9, "{v}");
    assert_clean_failure(&kiln(&["segment", "--checkpoint", photo, photo], &[]), "astronaut.png");
    assert_clean_failure(&kiln(&["train", "rcnn", "--dataset", "iris"], &[]), "rcnn and localize on object-scenes");
    let picture = dir.join("style.png");
    let o = kiln(&["style", "--steps", "2", "--size", "32", "--divisor", "16", "--out", picture.to_str().unwrap()], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("random He-normal weights") && picture.exists(), "{out}");
    assert_clean_failure(&kiln(&["style", "--content", "/nonexistent/photo.png", "--steps", "1"], &[]), "/nonexistent/photo.png");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn data_parallel_training_over_two_devices_and_its_errors() {
    let dir = temp_dir("devices");
    let o = kiln(&["train", "mlp", "--dataset", "digits", "--epochs", "1", "--train-limit", "200", "--devices", "0,0", "--json", "--out", dir.to_str().unwrap()], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("data-parallel over 2 devices"), "{err}");
    assert!(out.contains("data-parallel over 2 devices") && out.contains("replicas equal (checksum"), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["data_parallel"]["devices"].as_array().map(|d| d.len()), Some(2), "{v}");
    assert!(dir.join("last.safetensors").exists());
    let o = kiln(&["train", "mlp", "--dataset", "digits", "--epochs", "1", "--devices", "9"], &[]);
    assert_clean_failure(&o, "there is no adapter \"9\"");
    let o = kiln(&["train", "char-rnn", "--dataset", "moby-dick", "--devices", "0,0"], &[]);
    assert_clean_failure(&o, "has a loop of its own");
    let o = kiln(&["train", "mlp", "--dataset", "digits", "--devices", "0,0,0", "--train-limit", "2"], &[]);
    assert_clean_failure(&o, "cannot be shared between 3 devices");
    let o = kiln(&["train", "resnet", "--dataset", "digits", "--sync-bn"], &[]);
    assert_clean_failure(&o, "give --devices or --distributed too");
    let o = kiln(&["train", "resnet", "--dataset", "digits", "--devices", "0,0", "--sync-bn", "--train-limit", "65", "--batch-size", "32"], &[]);
    assert_clean_failure(&o, "each epoch ends with a batch of 1 rows");
}

#[test]
fn yolo_saves_a_checkpoint_that_detect_and_localize_train_and_errors() {
    let dir = temp_dir("detect");
    let d = dir.to_str().unwrap();
    let o = kiln(&["train", "yolo", "--dataset", "object-scenes", "--steps", "3", "--image-size", "48", "--out", d], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let ck = dir.join("yolo.safetensors");
    assert!(ck.exists() && text(&o).0.contains("kiln detect"), "{}", text(&o).0);
    // Pictures of held-out scenes every fifth of the run (3 steps: every step).
    for step in 1..=3 {
        assert!(dir.join(format!("scenes-step-{step:06}.png")).exists(), "the picture after step {step}");
    }
    // A picture of another size: boxes come back in its own pixels.
    let photo = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/images/astronaut.png");
    let png = dir.join("found.png");
    let o = kiln(&["detect", "--checkpoint", ck.to_str().unwrap(), photo, "--min-score", "0", "--out", png.to_str().unwrap(), "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(png.exists(), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let found = v["detections"].as_array().expect("a list of detections");
    for det in found {
        assert!(det["name"].as_str().is_some_and(|n| n.starts_with("digit")) && det["bbox"].as_array().map(|b| b.len()) == Some(4), "{det}");
    }
    // YOLOv1's layout: saved with its boxes a cell, and read back by `kiln detect`.
    let v1 = dir.join("v1");
    // The data set's own scenes (--scenes full: 2-6 objects of both sources, 20 classes), here at 64 pixels, with
    // no pictures on the way.
    let o = kiln(
        &["train", "yolo", "--dataset", "object-scenes", "--layout", "v1", "--scenes", "full", "--image-size", "64", "--sample-every", "0", "--steps", "3", "--out", v1.to_str().unwrap(), "--json"],
        &[],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("64 x 64 object scenes of 2-6 digits and Fashion-MNIST items at 0.5-2x (20 classes)"), "{err}");
    assert!(!v1.join("scenes-step-000003.png").exists() && v1.join("scenes.png").exists());
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["layout"] == "v1 (2 boxes a cell)" && r["parameters"].as_u64().is_some(), "{r}");
    let o = kiln(&["detect", "--checkpoint", v1.join("yolo.safetensors").to_str().unwrap(), photo, "--min-score", "0", "--out", png.to_str().unwrap(), "--json"], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    // Bad input: a checkpoint of another model, a missing picture, a threshold out of range.
    let mlp = dir.join("mlp");
    assert!(kiln(&["train", "logreg", "--dataset", "iris", "--epochs", "1", "--out", mlp.to_str().unwrap()], &[]).status.success());
    assert_clean_failure(&kiln(&["detect", "--checkpoint", mlp.join("last.safetensors").to_str().unwrap(), photo], &[]), "not a YOLO checkpoint");
    assert_clean_failure(&kiln(&["detect", "--checkpoint", ck.to_str().unwrap(), "/nonexistent/picture.png"], &[]), "/nonexistent/picture.png");
    assert_clean_failure(&kiln(&["detect", "--checkpoint", ck.to_str().unwrap(), photo, "--min-score", "1.5"], &[]), "--min-score");
    assert_clean_failure(&kiln(&["segment", "--checkpoint", ck.to_str().unwrap(), photo], &[]), "not a segmentation checkpoint");
    // Classification with localisation from the command line, and a loss it does not know.
    let o = kiln(&["train", "localize", "--dataset", "object-scenes", "--steps", "2", "--image-size", "48", "--out", d, "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["presence_accuracy"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)) && r["loss"] == "Mixed", "{r}");
    assert_clean_failure(&kiln(&["train", "localize", "--dataset", "object-scenes", "--loss", "triplet"], &[]), "unknown localisation loss");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn autoencoder_vae_and_siamese_train_from_the_command_line() {
    let dir = temp_dir("generative");
    let d = dir.to_str().unwrap();
    let o = kiln(&["train", "autoencoder", "--dataset", "mnist", "--steps", "3", "--mlp", "--noise", "0.3", "--out", d, "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["kind"] == "Mlp" && r["test_mse"].as_f64().is_some_and(|v| v.is_finite()), "{r}");
    assert!(dir.join("reconstructions.png").exists());
    let o = kiln(&["train", "vae", "--dataset", "mnist", "--steps", "3", "--latent", "2", "--out", d, "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["test_elbo"].as_f64().is_some_and(|v| v < 0.0), "{r}");
    assert!(out.contains("picture"), "{out}");
    // Siamese: batch-all mining by default, scored on the features before the projection when asked; the
    // small trunk (one convolution a stage, no batch norm) on request.
    let o = kiln(&["train", "siamese", "--dataset", "fashion-mnist", "--steps", "2", "--score-on", "features", "--trunk", "small", "--channels", "8,8,16", "--out", d, "--json"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(
        r["loss"] == "triplet (batch-all)"
            && r["representation"] == "features"
            && r["parameters"].as_u64() == Some(8 * 9 + 8 + 8 * 8 * 9 + 8 + 16 * 8 * 9 + 16 + 144 * 128 + 128)
            && r["trained"]["auc"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)),
        "{r}"
    );
    assert!(dir.join("embeddings.png").exists());
    assert_clean_failure(&kiln(&["train", "siamese", "--dataset", "fashion-mnist", "--loss", "minimax"], &[]), "siamese trains with triplet or contrastive");
    assert_clean_failure(&kiln(&["train", "siamese", "--dataset", "fashion-mnist", "--channels", "8,8"], &[]), "three stages' channels");
    assert_clean_failure(&kiln(&["train", "dcgan", "--dataset", "mnist", "--loss", "triplet"], &[]), "dcgan trains with nonsaturating");
    assert_clean_failure(&kiln(&["train", "vae", "--dataset", "fashion-mnist"], &[]), "vae on mnist");
    std::fs::remove_dir_all(&dir).ok();
}
