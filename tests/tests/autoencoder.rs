//! Autoencoders (kiln_models::autoencoder): shapes and bad input for both kinds, and short runs in which the
//! plain one learns to reconstruct and the denoising one to remove noise.

use kiln_graph::Tensor;
use kiln_models::autoencoder::{train_autoencoder, AeConfig, AeKind, Autoencoder};
use kiln_nn::VarStore;
use kiln_tests::require_gpu;

#[test]
fn both_kinds_code_and_decode_and_reject_bad_input() {
    require_gpu();
    for kind in [AeKind::Mlp, AeKind::Conv] {
        let mut vs = VarStore::new(1);
        let ae = Autoencoder::new(&mut vs, kind, 12).unwrap();
        vs.finish().unwrap();
        let x = Tensor::zeros(&[3, 784]).unwrap();
        assert_eq!(ae.encode(&x).unwrap().shape(), &[3, 12], "{kind:?}");
        assert_eq!(ae.decode(&ae.encode(&x).unwrap()).unwrap().shape(), &[3, 784], "{kind:?}");
        let e = ae.encode(&Tensor::zeros(&[3, 28, 28]).unwrap()).unwrap_err().to_string();
        assert!(e.contains("[3, 28, 28]"), "{e}");
    }
    assert!(Autoencoder::new(&mut VarStore::new(1), AeKind::Mlp, 0).err().expect("code 0").to_string().contains("code size"));
}

#[test]
fn short_runs_reconstruct_and_denoise() {
    require_gpu();
    let plain = AeConfig { kind: AeKind::Mlp, steps: 150, ..Default::default() };
    let (_, r, [input, output, _]) = train_autoencoder(&plain, |_, _| {}).unwrap();
    eprintln!("{r:?}");
    assert!(r.last_loss < 0.6 * r.first_loss, "loss {} -> {}", r.first_loss, r.last_loss);
    assert_eq!((input.len(), output.len()), (8 * 784, 8 * 784));
    // The denoiser's reconstructions are closer to the clean digits than its noisy inputs are.
    let noisy = AeConfig { kind: AeKind::Conv, noise: 0.5, steps: 150, ..Default::default() };
    let (_, r, _) = train_autoencoder(&noisy, |_, _| {}).unwrap();
    eprintln!("{r:?}");
    // Seed 42 on lavapipe: 0.067 against 0.116.
    assert!(r.test_mse < 0.7 * r.input_mse, "reconstruction MSE {} against the noisy inputs' {}", r.test_mse, r.input_mse);
}
