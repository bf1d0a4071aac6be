//! GPU data augmentation: seeded, each transform against a CPU reference where it is exact.

use kiln_graph::{Augment, Tensor};
use kiln_tests::{require_gpu, test_rng};

fn batch(n: usize, h: usize, w: usize) -> (Vec<f32>, Tensor) {
    let mut rng = test_rng("augment");
    let v: Vec<f32> = (0..n * h * w).map(|_| rng.range(0.0, 1.0) as f32).collect();
    let t = Tensor::from_slice(&v, &[n, 1, h, w]).unwrap();
    (v, t)
}

#[test]
fn same_seed_same_images_and_identity_when_off() {
    require_gpu();
    let (v, x) = batch(8, 9, 7);
    let a: Augment = "flip,shift:2,rotate:15,scale:0.1,jitter:0.2,noise:0.05".parse().unwrap();
    assert_eq!(x.augment(&a, 5).unwrap().to_vec().unwrap(), x.augment(&a, 5).unwrap().to_vec().unwrap());
    assert_ne!(x.augment(&a, 5).unwrap().to_vec().unwrap(), x.augment(&a, 6).unwrap().to_vec().unwrap());
    assert_eq!(x.augment(&Augment::default(), 5).unwrap().to_vec().unwrap(), v);
}

#[test]
fn flip_mirrors_some_samples_exactly() {
    require_gpu();
    let (n, h, w) = (32, 5, 6);
    let (v, x) = batch(n, h, w);
    let y = x.augment(&Augment { flip: true, ..Default::default() }, 1).unwrap().to_vec().unwrap();
    let mut flipped = 0;
    for s in 0..n {
        let img = &v[s * h * w..(s + 1) * h * w];
        let out = &y[s * h * w..(s + 1) * h * w];
        let mirror: Vec<f32> = (0..h * w).map(|i| img[(i / w) * w + (w - 1 - i % w)]).collect();
        if out == mirror {
            flipped += 1;
        } else {
            assert_eq!(out, img, "sample {s} is neither itself nor its mirror");
        }
    }
    assert!((4..=28).contains(&flipped), "{flipped} of {n} flipped");
}

#[test]
fn shift_moves_content_and_fills_with_zero() {
    require_gpu();
    let (n, h, w) = (16, 8, 8);
    let (v, x) = batch(n, h, w);
    let y = x.augment(&Augment { shift: 2, ..Default::default() }, 3).unwrap().to_vec().unwrap();
    let mut shifts = std::collections::HashSet::new();
    for s in 0..n {
        let img = &v[s * h * w..(s + 1) * h * w];
        let out = &y[s * h * w..(s + 1) * h * w];
        // Some shift (dy, dx) in [-2, 2]^2 explains the output exactly (the images are random, so one does).
        let explains = |dy: i32, dx: i32| {
            (0..h as i32).all(|r| {
                (0..w as i32).all(|c| {
                    let (sr, sc) = (r - dy, c - dx);
                    let want = if sr < 0 || sc < 0 || sr >= h as i32 || sc >= w as i32 { 0.0 } else { img[(sr * w as i32 + sc) as usize] };
                    out[(r * w as i32 + c) as usize] == want
                })
            })
        };
        let found: Vec<(i32, i32)> = (-2i32..=2).flat_map(|dy| (-2i32..=2).map(move |dx| (dy, dx))).filter(|&(dy, dx)| explains(dy, dx)).collect();
        assert_eq!(found.len(), 1, "sample {s}: not exactly one shift explains it: {found:?}");
        shifts.insert(found[0]);
    }
    // The shifts are drawn: an identity "augmentation" (every sample at (0, 0)) fails here. 16 draws from 25
    // shifts give at least 5 distinct ones except with negligible probability.
    assert!(shifts.len() >= 5, "only {} distinct shifts in {n} samples: {shifts:?}", shifts.len());
}

#[test]
fn noise_has_the_asked_deviation_and_jitter_stays_in_bounds() {
    require_gpu();
    let x = Tensor::zeros(&[4, 1, 64, 64]).unwrap();
    let y = x.augment(&Augment { noise: 0.5, ..Default::default() }, 9).unwrap().to_vec().unwrap();
    let mean = y.iter().sum::<f32>() / y.len() as f32;
    let std = (y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / y.len() as f32).sqrt();
    assert!(mean.abs() < 0.03 && (std - 0.5).abs() < 0.03, "mean {mean} std {std}");
    let ones = Tensor::ones(&[16, 1, 4, 4]).unwrap();
    let j = ones.augment(&Augment { brightness: 0.2, contrast: 0.1, ..Default::default() }, 2).unwrap().to_vec().unwrap();
    assert!(j.iter().all(|&v| (0.7..=1.3).contains(&v)), "jitter out of bounds");
    assert!("warp".parse::<Augment>().is_err());
}
