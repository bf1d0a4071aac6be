//! `kiln train --distributed mpi` under `mpirun` (built with `--features mpi`; scripts/test runs this file
//! when OpenMPI is installed, which scripts/setup does): two ranks train as one process does, a rank's
//! failure ends every rank within seconds, and a run resumes with another number of ranks.
#![cfg(feature = "mpi")]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn mpirun(ranks: &[&[&str]]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe"]);
    for (i, args) in ranks.iter().enumerate() {
        if i > 0 {
            c.arg(":");
        }
        c.args(["-np", "1", KILN]).args(*args);
    }
    c
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-mpi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn weights(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    kiln_nn::checkpoint::load(path).unwrap().tensors.into_iter().map(|t| (t.name, t.data)).collect()
}

/// The largest difference between two runs' last weights (`out/last.safetensors`), relative to each tensor's
/// largest magnitude (at least `floor`), asserted below `tolerance` tensor by tensor.
fn worst_relative_difference(run: &std::path::Path, reference: &std::path::Path, floor: f64, tolerance: f64, what: &str) -> f64 {
    let (a, b) = (weights(&run.join("last.safetensors")), weights(&reference.join("last.safetensors")));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let scale = y.iter().fold(floor, |m, v| m.max(v.abs() as f64));
        let d = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((*p as f64 - *q as f64).abs())) / scale;
        assert!(d < tolerance, "{name}: {what} differ by {d:.3e} (relative)");
        worst = worst.max(d);
    }
    worst
}

/// 640 digits, a whole batch of 32 (16 per rank), 20 steps of SGD with momentum.
fn mlp_args(out: &str) -> Vec<String> {
    ["train", "mlp", "--dataset", "digits", "--epochs", "1", "--train-limit", "640", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--json", "--out", out]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn two_ranks_train_as_one_process_with_the_whole_batch() {
    let dir = temp_dir("exact");
    let (one, two) = (dir.join("one"), dir.join("two"));
    let o = Command::new(KILN).args(mlp_args(one.to_str().unwrap())).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let mut args = mlp_args(two.to_str().unwrap());
    args.extend(["--distributed".into(), "mpi".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = mpirun(&[&args, &args]).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // Rank 0 alone prints the report.
    assert_eq!(out.matches("\"data_parallel\"").count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["data_parallel"]["ranks"], 2, "{v}");
    assert_eq!(v["steps"], 20);
    let worst = worst_relative_difference(&two, &one, 1e-12, 1e-5, "two ranks and one process");
    eprintln!("max relative difference after 20 steps, 2 ranks against 1 process: {worst:.3e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn synchronised_batch_norm_over_two_ranks_of_two_devices_trains_as_one_process() {
    // A ResNet-8 (batch norm after every convolution) on 640 digits, a whole batch of 32: four replicas of 8
    // rows (two ranks, two devices each) with --sync-bn against one process with the whole batch.
    let dir = temp_dir("sync-bn");
    let args = |out: &std::path::Path| -> Vec<String> {
        ["train", "resnet", "--depth", "8", "--dataset", "digits", "--epochs", "1", "--train-limit", "640", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.display().to_string()])
            .collect()
    };
    let (one, two) = (dir.join("one"), dir.join("two"));
    let o = Command::new(KILN).args(args(&one)).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let mut rank = args(&two);
    rank.extend(["--distributed", "mpi", "--devices", "0,0", "--sync-bn"].map(String::from));
    let rank: Vec<&str> = rank.iter().map(String::as_str).collect();
    let o = mpirun(&[&rank, &rank]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    // Batch norm's statistics sum 2,048 values a channel in another order on each side (f32: a few 1e-6
    // relative a step), and its 1/sigma amplifies them through 20 steps: measured 3.8e-5 at worst, on a bias
    // of magnitude 0.025. Without synchronisation (each replica's own 8 rows) the first weights differ by 7e-2.
    let worst = worst_relative_difference(&two, &one, 1e-2, 1e-4, "2 ranks x 2 devices with synchronised batch norm and one process");
    eprintln!("synchronised batch norm, 2 ranks x 2 devices against 1 process, 20 steps: {worst:.3e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_that_cannot_open_its_adapter_or_runs_other_settings_ends_every_rank() {
    let dir = temp_dir("bad");
    let out = dir.to_str().unwrap();
    let good = ["train", "mlp", "--dataset", "digits", "--epochs", "1", "--distributed", "mpi", "--out", out];
    let no_adapter = ["train", "mlp", "--dataset", "digits", "--epochs", "1", "--distributed", "mpi", "--out", out, "--devices", "no-such-gpu"];
    let other_lr = ["train", "mlp", "--dataset", "digits", "--epochs", "1", "--distributed", "mpi", "--out", out, "--lr", "0.5"];
    for (rank1, needle) in [(&no_adapter[..], "there is no adapter \"no-such-gpu\""), (&other_lr[..], "rank 1 runs another")] {
        let started = Instant::now();
        let o = mpirun(&[&good, rank1]).output().unwrap();
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains(needle) && err.contains("ending every rank"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process of `rank` whose command line names `dir`.
fn rank_pid(rank: usize, dir: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let has = |hay: &[u8], needle: &str| hay.split(|&b| b == 0).any(|part| part == needle.as_bytes());
        (has(&cmdline, dir) && has(&environ, &format!("OMPI_COMM_WORLD_RANK={rank}"))).then_some(pid)
    })
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_on_another_number_of_ranks() {
    let dir = temp_dir("kill");
    let out = dir.to_str().unwrap();
    let args = ["train", "mlp", "--dataset", "digits", "--epochs", "400", "--train-limit", "640", "--batch-size", "32", "--distributed", "mpi", "--out", out];
    let mut job = mpirun(&[&args, &args]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait for a checkpoint (epoch ends write one every few seconds), then kill rank 1.
    let started = Instant::now();
    while !dir.join("resume.safetensors").exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint after two minutes");
        assert!(job.try_wait().unwrap().is_none(), "the job ended before its first checkpoint");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = rank_pid(1, out).expect("rank 1's process");
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = job.kill();
            panic!("the job still ran 30 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    eprintln!("the job ended {:.1} s after rank 1 was killed", killed.elapsed().as_secs_f64());
    // The last checkpoint is good: one process (another number of ranks) resumes from it for one more epoch.
    let ck = kiln_nn::checkpoint::load(&dir.join("resume.safetensors")).unwrap();
    let epoch: usize = ck.metadata["kiln.epoch"].parse().unwrap();
    let more = (epoch + 1).to_string();
    let o = Command::new(KILN).args(["train", "mlp", "--dataset", "digits", "--epochs", &more, "--train-limit", "640", "--batch-size", "32", "--out", out, "--resume", "--json"]).output().unwrap();
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["epochs"].as_u64(), Some(epoch as u64 + 1), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_all_reduce_between_ranks_is_benchmarked() {
    let dir = temp_dir("bench");
    let json = dir.join("bench.json");
    // A budget no load on the cores can exceed: every size must be timed, however busy the machine.
    let args = ["bench", "--filter", "allreduce", "--distributed", "mpi", "--budget-s", "600", "--json", json.to_str().unwrap()];
    let o = mpirun(&[&args, &args]).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // Rank 0 alone prints.
    assert_eq!(out.matches("adapter:").count(), 1, "{out}");
    let records: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows: Vec<&serde_json::Value> = records.iter().filter(|r| r["kernel"] == "all-reduce over 2 MPI ranks (host-staged)").collect();
    assert_eq!(rows.len(), 6, "{records:?}");
    for r in rows {
        assert!(r["valid"] == true && r["median_ms"].as_f64().is_some_and(|ms| ms > 0.0) && r["gbps"].as_f64().is_some(), "{r}");
    }
    let o = Command::new(KILN).args(["bench", "--filter", "matmul", "--distributed", "mpi"]).output().unwrap();
    assert!(!o.status.success() && text(&o).1.contains("give --filter allreduce"), "{}", text(&o).1);
    let _ = std::fs::remove_dir_all(&dir);
}
