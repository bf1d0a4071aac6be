//! Every matmul kernel against the f64 CPU reference on fresh random shapes (odd sizes, transposes, batches,
//! broadcast operands), and the autotuner: it picks a valid kernel, writes its cache, and a second tuner on
//! the same cache times nothing.

use kiln_graph::kernels::{self, MatmulVariant};
use kiln_graph::tune::{self, Mode, Tuner};
use kiln_tests::{require_gpu, test_rng};

fn variants() -> Vec<MatmulVariant> {
    MatmulVariant::ALL.to_vec()
}

#[test]
fn every_matmul_variant_matches_the_cpu_reference() {
    let g = require_gpu();
    let mut rng = test_rng("matmul variants");
    let mut checked = 0;
    for v in variants() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for round in 0..3 {
                // Odd sizes around the tile edges (1, 7, 33, 65, 129...), multiples of 4 for vec4.
                let pick = |rng: &mut kiln_graph::Rng| -> usize { [1, 3, 7, 8, 31, 33, 64, 65, 97, 129, 191][rng.below(11)] };
                let (mut m, mut n, mut k) = (pick(&mut rng), pick(&mut rng), pick(&mut rng));
                // The 128x128 tiles load 16 bytes at a time on aligned shapes: rounds 0 and 2 test that path.
                if matches!(v, MatmulVariant::Vec4 | MatmulVariant::Vec4x8 | MatmulVariant::Tiled128K16) || (v == MatmulVariant::Tiled128 && round != 1) {
                    (m, n, k) = (m.next_multiple_of(4), n.next_multiple_of(4), k.next_multiple_of(4));
                }
                let batch = 1 + round % 3;
                if !v.supports(g, m, n, k, ta, tb).unwrap() {
                    assert!(matches!(v, MatmulVariant::Subgroup(_)), "{} refused {m}x{n}x{k}", v.name());
                    continue;
                }
                let ok = tune::check_against_cpu(g, v, batch, m, n, k, ta, tb).unwrap();
                assert!(ok, "{} wrong on batch {batch} m {m} n {n} k {k} trans_a {ta} trans_b {tb} ({})", v.name(), g.adapter_name());
                checked += 1;
            }
        }
    }
    // Lavapipe has subgroups of 8: every variant must have run there.
    if g.adapter_name().contains("llvmpipe") {
        assert_eq!(checked, variants().len() * 12);
    }
}

#[test]
fn vec4_refuses_unaligned_shapes_with_an_error() {
    let g = require_gpu();
    let a = kernels::random_uniform(g, 7 * 5, 1, 0).unwrap();
    let b = kernels::random_uniform(g, 5 * 3, 2, 0).unwrap();
    let e = kernels::matmul_with(MatmulVariant::Vec4, &a, &b, 1, 7, 3, 5, 0, 0, false, false).err().expect("vec4 on 7x3x5 must be refused");
    assert!(e.to_string().contains("vec4"), "{e}");
}

#[test]
fn autotuner_caches_its_choice_on_disk() {
    let g = require_gpu();
    let dir = std::env::temp_dir().join(format!("kiln-tune-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (m, n, k) = (128, 96, 200); // above TUNE_MIN_FLOPS, so it is tuned
    let mut first = Tuner::open(g, Mode::On, Some(&dir)).unwrap();
    let t = first.tune(g, 1, m, n, k, false, true).unwrap();
    // Every candidate of this adapter either was timed or was ruled out, and nothing else was.
    let timed: Vec<MatmulVariant> = t.timings.iter().map(|(v, _)| *v).collect();
    assert_eq!(timed, tune::candidates(g, m).unwrap());
    assert!(t.timings.iter().any(|(_, ms)| ms.is_some()));
    let chosen = first.choose(g, 1, m, n, k, false, true).unwrap();
    assert_eq!(first.tuned, 1);
    assert!(tune::check_against_cpu(g, chosen, 1, m, n, k, false, true).unwrap(), "tuner chose a wrong kernel {}", chosen.name());
    let file = tune::cache_file(g, &dir).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&chosen.name()), "{text}");
    // A second process (a new tuner on the same directory) reads the choice and times nothing.
    let mut second = Tuner::open(g, Mode::On, Some(&dir)).unwrap();
    assert_eq!(second.choose(g, 1, m, n, k, false, true).unwrap(), chosen);
    assert_eq!(second.tuned, 0);
    // `force` re-tunes once per class and process; `off` never tunes.
    let mut forced = Tuner::open(g, Mode::Force, Some(&dir)).unwrap();
    forced.choose(g, 1, m, n, k, false, true).unwrap();
    forced.choose(g, 1, m, n, k, false, true).unwrap();
    assert_eq!(forced.tuned, 1);
    let mut off = Tuner::open(g, Mode::Off, Some(&dir)).unwrap();
    off.choose(g, 1, m, n, k, false, true).unwrap();
    assert_eq!(off.tuned, 0);
    // A corrupt cache is ignored (and named on stderr), then replaced.
    std::fs::write(&file, "{ not json").unwrap();
    let mut fresh = Tuner::open(g, Mode::On, Some(&dir)).unwrap();
    fresh.choose(g, 1, m, n, k, false, true).unwrap();
    assert_eq!(fresh.tuned, 1);
    assert!(std::fs::read_to_string(&file).unwrap().contains("choices"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_tuners_sharing_a_cache_file_keep_each_others_choices() {
    // Two devices on one adapter share its cache file: each tunes a shape class the other does not, and the
    // file ends with both (a save merges with what is there instead of overwriting it).
    let g = require_gpu();
    let dir = std::env::temp_dir().join(format!("kiln-tune-shared-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut a = Tuner::open(g, Mode::On, Some(&dir)).unwrap();
    let mut b = Tuner::open(g, Mode::On, Some(&dir)).unwrap();
    a.choose(g, 1, 128, 96, 200, false, true).unwrap();
    b.choose(g, 1, 96, 256, 160, true, false).unwrap();
    assert_eq!((a.tuned, b.tuned), (1, 1));
    let mut reader = Tuner::open(g, Mode::On, Some(&dir)).unwrap();
    reader.choose(g, 1, 128, 96, 200, false, true).unwrap();
    reader.choose(g, 1, 96, 256, 160, true, false).unwrap();
    assert_eq!(reader.tuned, 0, "both choices are in the file: {}", std::fs::read_to_string(tune::cache_file(g, &dir).unwrap()).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn softmax_of_long_rows_matches_the_cpu_reference() {
    require_gpu();
    let mut rng = test_rng("long softmax");
    for cols in [1000usize, 8192, 8193, 32768, 70000] {
        let rows = 5;
        let host: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
        let x = kiln_graph::Tensor::from_slice(&host, &[rows, cols]).unwrap();
        let got = x.softmax(1).unwrap().to_vec().unwrap();
        let want = kiln_graph::cpu::CpuTensor::from_f32(&host, &[rows, cols]).softmax(1, false);
        let worst = got.iter().zip(&want.data).map(|(g, w)| ((*g as f64 - w) / w).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4, "softmax [{rows}, {cols}]: worst relative error {worst:.3e}");
        let got = x.log_softmax(1).unwrap().to_vec().unwrap();
        let want = kiln_graph::cpu::CpuTensor::from_f32(&host, &[rows, cols]).softmax(1, true);
        let worst = got.iter().zip(&want.data).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4, "log_softmax [{rows}, {cols}]: worst error {worst:.3e}");
    }
}

/// Lavapipe silently ends an invocation's loops after 65535 iterations in all; kernels whose loops grow with
/// the data run in pieces. Each matmul kernel at three times its per-dispatch k, and long reductions.
#[test]
fn long_loops_are_split_below_the_lavapipe_iteration_limit() {
    let g = require_gpu();
    for v in variants() {
        for (m, n, k) in [(5, 7, 3 * 1024 + 5), (8, 8, 3 * 2048 + 4), (8, 8, 3 * 8192 + 4), (5, 7, 3 * 32768 + 5)] {
            if v.supports(g, m, n, k, false, false).unwrap() {
                assert!(tune::check_against_cpu(g, v, 1, m, n, k, false, false).unwrap(), "{} wrong at m {m} n {n} k {k}", v.name());
            }
            if v.supports(g, m, n, k, true, true).unwrap() {
                assert!(tune::check_against_cpu(g, v, 1, m, n, k, true, true).unwrap(), "{} wrong transposed at m {m} n {n} k {k}", v.name());
            }
        }
    }
    let mut rng = test_rng("long reductions");
    let n = 300_007;
    let host: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let x = kiln_graph::Tensor::from_slice(&host, &[n]).unwrap();
    let sum = x.sum_all().unwrap().to_vec().unwrap()[0] as f64;
    let want: f64 = host.iter().map(|v| *v as f64).sum();
    assert!((sum - want).abs() < 1e-3 * (n as f64).sqrt(), "sum of {n}: {sum} vs {want}");
    let max = x.max(0, false).unwrap().to_vec().unwrap()[0];
    assert_eq!(max, host.iter().copied().fold(f32::MIN, f32::max), "max of {n}");
}

#[test]
fn index_select_gradient_over_many_indices() {
    // More indices than one invocation may loop over on lavapipe: the gradient is summed in pieces.
    require_gpu();
    let mut rng = test_rng("index_select long");
    let (rows, n_idx) = (7usize, 9 * kiln_graph::kernels::LOOP_CHUNK + 11); // past 65535
    let idx: Vec<u32> = (0..n_idx).map(|_| rng.below(rows) as u32).collect();
    let g: Vec<f32> = (0..n_idx * 2).map(|_| rng.normal() as f32).collect();
    let table = kiln_graph::Tensor::zeros(&[rows, 2]).unwrap().var();
    let picked = table.index_select(0, &kiln_graph::Tensor::from_u32(&idx, &[n_idx]).unwrap()).unwrap();
    let weights = kiln_graph::Tensor::from_slice(&g, &[n_idx, 2]).unwrap();
    let grads = picked.mul(&weights).unwrap().sum_all().unwrap().backward().unwrap();
    let got = grads.get(&table).unwrap().to_vec().unwrap();
    let mut want = vec![0f64; rows * 2];
    for (j, &r) in idx.iter().enumerate() {
        for c in 0..2 {
            want[r as usize * 2 + c] += g[j * 2 + c] as f64;
        }
    }
    for (a, b) in got.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-3 * (1.0 + b.abs()), "got {got:?} want {want:?}");
    }
}

/// The subgroup kernels read texture copies of their operands; operands that are sub-ranges of a buffer at any
/// 4-byte offset (which a texture copy cannot start from) are copied out first, and a last partial texel is
/// copied whole. Both kernels (scalar and 16-byte loads), each transpose.
#[test]
fn subgroup_kernels_read_operands_at_any_offset() {
    let g = require_gpu();
    if !MatmulVariant::Subgroup(8).supports(g, 1, 1, 1, false, false).unwrap() {
        return; // no subgroups here: the variant never runs (the first test checks lavapipe runs it)
    }
    let mut rng = test_rng("texture operands");
    for (m, n, k) in [(13, 9, 11), (16, 32, 64)] {
        for (ta, tb) in [(false, false), (true, true), (false, true), (true, false)] {
            let a_host: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b_host: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            // Each operand sits 1 + rng.below(7) floats into a bigger buffer.
            let (a_skip, b_skip) = (1 + rng.below(7), 1 + rng.below(7));
            let place = |host: &[f32], skip: usize| {
                let mut data = vec![0f32; skip];
                data.extend_from_slice(host);
                data.extend(std::iter::repeat_n(f32::NAN, 5)); // past the operand: must never be read
                let view = g.upload(bytemuck::cast_slice(&data), "offset operand").unwrap();
                view.sub(4 * skip as u64, 4 * host.len() as u64)
            };
            let (a, b) = (place(&a_host, a_skip), place(&b_host, b_skip));
            let at = |r: usize, kk: usize| if ta { a_host[kk * m + r] } else { a_host[r * k + kk] } as f64;
            let bt = |kk: usize, c: usize| if tb { b_host[c * k + kk] } else { b_host[kk * n + c] } as f64;
            for v in [MatmulVariant::Subgroup(8), MatmulVariant::Subgroup(16)] {
                let c = kernels::matmul_with(v, &a, &b, 1, m, n, k, 0, 0, ta, tb).unwrap();
                let got: Vec<f32> = bytemuck::cast_slice(&g.read(&c).unwrap()[..4 * m * n]).to_vec();
                for r in 0..m {
                    for col in 0..n {
                        let want: f64 = (0..k).map(|kk| at(r, kk) * bt(kk, col)).sum();
                        let err = (got[r * n + col] as f64 - want).abs();
                        assert!(err < 1e-4 * (1.0 + want.abs()), "{} {m}x{n}x{k} ta {ta} tb {tb} offsets {a_skip}/{b_skip}: C[{r},{col}] = {} want {want}", v.name(), got[r * n + col]);
                    }
                }
            }
        }
    }
}

/// Texture copies are reused while their buffer is unchanged; every way a buffer changes (a host write, a
/// buffer copy into it, a kernel writing it) must retire them, or the next product would read stale values.
#[test]
fn texture_copies_follow_every_write_to_their_buffer() {
    let g = require_gpu();
    if !MatmulVariant::Subgroup(8).supports(g, 1, 1, 1, false, false).unwrap() {
        return;
    }
    let mut rng = test_rng("texture cache");
    let (m, n, k) = (9, 12, 16);
    let random = |rng: &mut kiln_graph::Rng, len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
    let product = |a: &[f32], b: &[f32]| -> Vec<f32> { (0..m * n).map(|i| (0..k).map(|kk| a[(i / n) * k + kk] * b[kk * n + i % n]).sum()).collect() };
    let check = |a_view: &kiln_graph::backend::BufView, b_view: &kiln_graph::backend::BufView, a: &[f32], b: &[f32], when: &str| {
        let c = kernels::matmul_with(MatmulVariant::Subgroup(16), a_view, b_view, 1, m, n, k, 0, 0, false, false).unwrap();
        let got: Vec<f32> = bytemuck::cast_slice(&g.read(&c).unwrap()[..4 * m * n]).to_vec();
        for (i, (x, y)) in got.iter().zip(product(a, b)).enumerate() {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{when}: C[{i}] = {x}, want {y}");
        }
    };
    let (mut a, b) = (random(&mut rng, m * k), random(&mut rng, k * n));
    let a_view = g.upload(bytemuck::cast_slice(&a), "a").unwrap();
    let b_view = g.upload(bytemuck::cast_slice(&b), "b").unwrap();
    check(&a_view, &b_view, &a, &b, "first product");
    check(&a_view, &b_view, &a, &b, "same operands again");
    a = random(&mut rng, m * k);
    g.write(&a_view, bytemuck::cast_slice(&a)).unwrap();
    check(&a_view, &b_view, &a, &b, "after a host write");
    a = random(&mut rng, m * k);
    let other = g.upload(bytemuck::cast_slice(&a), "a'").unwrap();
    g.copy(&other, &a_view, 4 * (m * k) as u64).unwrap();
    check(&a_view, &b_view, &a, &b, "after a buffer copy");
    a = random(&mut rng, m * k);
    let source = g.upload(bytemuck::cast_slice(&a), "a''").unwrap();
    kernels::strided_copy(&source, 0, &[k, 1], &a_view, 0, &[k, 1], &[m, k]).unwrap();
    check(&a_view, &b_view, &a, &b, "after a kernel wrote it");
}
