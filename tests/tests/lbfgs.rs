//! L-BFGS (kiln_nn::lbfgs) against PyTorch's torch.optim.LBFGS on the same problems: the iterates after
//! each `step` call, the losses it returns and the closure evaluations (tests/data/lbfgs_reference.json, from
//! scripts/lbfgs_reference.py).

use kiln_nn::lbfgs::Lbfgs;

fn rosenbrock(x: &[f32]) -> (f32, Vec<f32>) {
    let (a, b) = (x[0], x[1]);
    let loss = (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2);
    (loss, vec![-2.0 * (1.0 - a) - 400.0 * a * (b - a * a), 200.0 * (b - a * a)])
}

fn quadratic(x: &[f32]) -> (f32, Vec<f32>) {
    let a = [[4.0f32, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]];
    let b = [1.0f32, -2.0, 0.5];
    let ax: Vec<f32> = (0..3).map(|i| (0..3).map(|j| a[i][j] * x[j]).sum()).collect();
    let loss = 0.5 * (0..3).map(|i| x[i] * ax[i]).sum::<f32>() - (0..3).map(|i| b[i] * x[i]).sum::<f32>();
    (loss, (0..3).map(|i| ax[i] - b[i]).collect())
}

#[test]
fn iterates_equal_pytorchs() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/lbfgs_reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let o = &case["options"];
        let mut opt = Lbfgs::with(o["lr"].as_f64().unwrap() as f32, o["max_iter"].as_u64().unwrap() as usize, o["history_size"].as_u64().unwrap() as usize);
        let f = if name.starts_with("rosenbrock") { rosenbrock } else { quadratic };
        let mut x = floats(&case["x0"]);
        for (k, (want_x, want_loss)) in case["iterates"].as_array().unwrap().iter().zip(case["losses"].as_array().unwrap()).enumerate() {
            let loss = opt.step(&mut x, |p| Ok(f(p))).unwrap();
            let want_loss = want_loss.as_f64().unwrap() as f32;
            assert!((loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1e-3), "{name}, call {k}: loss {loss} against torch's {want_loss}");
            for (g, w) in x.iter().zip(floats(want_x)) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{name}, call {k}: x {x:?} against torch's {want_x}");
            }
        }
        assert_eq!(opt.func_evals as u64, case["func_evals"].as_u64().unwrap(), "{name}: closure evaluations");
    }
}

#[test]
fn bad_settings_and_gradients_are_errors() {
    let mut x = vec![0.5f32, 0.5];
    let e = Lbfgs::with(0.0, 5, 5).step(&mut x, |p| Ok(rosenbrock(p))).unwrap_err().to_string();
    assert!(e.contains("lr 0 must be above 0"), "{e}");
    let e = Lbfgs::new(1.0).step(&mut x, |_| Ok((1.0, vec![1.0; 3]))).unwrap_err().to_string();
    assert!(e.contains("3 values for 2 parameters"), "{e}");
}
