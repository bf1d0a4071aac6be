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
