//! Data loading: the bundled sets parse to their documented sizes; corrupt and truncated files are errors
//! that name the file and the problem.

use std::io::Write;

use kiln_data::{load, polynomial_features, ArrayDataset, Batches, MeanNormalizer, Split, Standardizer, Targets};

#[test]
fn bundled_sets_have_their_documented_sizes() {
    for (name, n, d, classes) in [("digits", 1797, 64, Some(10)), ("breast-cancer", 569, 30, Some(2)), ("iris", 150, 4, Some(3)), ("wine", 178, 13, Some(3)), ("diabetes", 442, 10, None)] {
        let ds = load(name, None).unwrap();
        assert_eq!((ds.len(), ds.features, ds.num_classes()), (n, d, classes), "{name}");
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn truncated_csv_names_the_file_and_the_count() {
    let dir = temp_dir("truncated");
    let full = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/sklearn/iris.csv")).unwrap();
    let cut: String = full.lines().take(100).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("iris.csv"), cut).unwrap();
    let e = load("iris", Some(&dir)).unwrap_err().to_string();
    assert!(e.contains("iris.csv") && e.contains("150") && e.contains("truncated"), "{e}");
}

#[test]
fn bad_number_names_file_and_line() {
    let dir = temp_dir("badnum");
    std::fs::write(dir.join("iris.csv"), "3,4,a,b,c\n5.1,3.5,1.4,0.2,0\n4.9,oops,1.4,0.2,0\n").unwrap();
    let e = load("iris", Some(&dir)).unwrap_err().to_string();
    assert!(e.contains("iris.csv") && e.contains("line 3") && e.contains("oops"), "{e}");
}

#[test]
fn truncated_gzip_is_an_error_not_a_panic() {
    let dir = temp_dir("gz");
    let gz = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/sklearn/digits.csv.gz")).unwrap();
    std::fs::File::create(dir.join("digits.csv.gz")).unwrap().write_all(&gz[..gz.len() / 2]).unwrap();
    let e = load("digits", Some(&dir)).unwrap_err().to_string();
    assert!(e.contains("digits.csv.gz"), "{e}");
}

#[test]
fn label_out_of_range_is_an_error() {
    let dir = temp_dir("label");
    std::fs::write(dir.join("iris.csv"), "1,4,a,b,c\n5.1,3.5,1.4,0.2,7\n").unwrap();
    let e = load("iris", Some(&dir)).unwrap_err().to_string();
    assert!(e.contains("label 7"), "{e}");
}

#[test]
fn unknown_data_set_lists_the_known_ones() {
    let e = load("cifar", None).unwrap_err().to_string();
    assert!(e.contains("cifar") && e.contains("digits"), "{e}");
}

fn toy(n: usize) -> ArrayDataset {
    ArrayDataset { name: "toy".into(), x: (0..n * 2).map(|i| i as f32).collect(), features: 2, targets: Targets::Values((0..n).map(|i| i as f32).collect()), image: None }
}

#[test]
fn split_is_seeded_disjoint_and_complete() {
    let ds = toy(100);
    let a = Split::new(&ds, 0.2, 0.2, 7).unwrap();
    let b = Split::new(&ds, 0.2, 0.2, 7).unwrap();
    let c = Split::new(&ds, 0.2, 0.2, 8).unwrap();
    assert_eq!(a.train, b.train);
    assert_ne!(a.train, c.train);
    assert_eq!((a.train.len(), a.dev.len(), a.test.len()), (60, 20, 20));
    let mut all: Vec<f32> = [&a.train, &a.dev, &a.test].iter().flat_map(|d| d.values().unwrap().to_vec()).collect();
    all.sort_by(f32::total_cmp);
    assert_eq!(all, (0..100).map(|i| i as f32).collect::<Vec<_>>());
    assert!(Split::new(&ds, 0.6, 0.5, 1).is_err());
}

#[test]
fn scaling_uses_training_statistics_only() {
    let ds = toy(10);
    let s = Standardizer::fit(&ds);
    let z = s.apply(&ds);
    let col0: Vec<f32> = (0..10).map(|i| z.row(i)[0]).collect();
    let mean: f32 = col0.iter().sum::<f32>() / 10.0;
    let var: f32 = col0.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 10.0;
    assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
    // Applied to other data, the train statistics are used unchanged.
    let other = Standardizer::fit(&ds).apply(&toy(20));
    assert!((other.row(19)[0] - (38.0 - 9.0) / s.std[0] as f32).abs() < 1e-4);
    let m = MeanNormalizer::fit(&ds).apply(&ds);
    assert!((m.row(9)[0] - 0.5).abs() < 1e-6 && (m.row(0)[0] + 0.5).abs() < 1e-6);
}

#[test]
fn polynomial_features_of_one_and_two_features() {
    let one = ArrayDataset { name: "p".into(), x: vec![2.0, 3.0], features: 1, targets: Targets::Values(vec![0.0, 0.0]), image: None };
    let p = polynomial_features(&one, 3);
    assert_eq!((p.features, p.row(0).to_vec(), p.row(1).to_vec()), (3, vec![2.0, 4.0, 8.0], vec![3.0, 9.0, 27.0]));
    let two = ArrayDataset { name: "p".into(), x: vec![2.0, 5.0], features: 2, targets: Targets::Values(vec![0.0]), image: None };
    // [a, b, a^2, ab, b^2] as scikit-learn orders them
    assert_eq!(polynomial_features(&two, 2).row(0).to_vec(), vec![2.0, 5.0, 4.0, 10.0, 25.0]);
}

#[test]
fn batches_cover_every_sample_once_per_epoch() {
    let mut seen: Vec<usize> = Batches::new(103, 10, Some(3)).unwrap().flatten().collect();
    assert_eq!(Batches::new(103, 10, Some(3)).unwrap().count(), 11);
    seen.sort();
    assert_eq!(seen, (0..103).collect::<Vec<_>>());
    assert!(Batches::new(10, 0, None).is_err());
}

#[test]
fn mnist10k_and_its_seeded_split() {
    let all = kiln_data::load_mnist10k(None).unwrap();
    assert_eq!((all.len(), all.features, all.image, all.num_classes()), (10_000, 784, Some([1, 28, 28]), Some(10)));
    assert!(all.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    let s = kiln_data::load_split("mnist", None, 42).unwrap();
    assert_eq!((s.train.len(), s.dev.len(), s.test.len()), (7200, 800, 2000));
    assert_eq!(kiln_data::load_split("mnist", None, 42).unwrap().test, s.test, "same seed, same split");
}

#[test]
fn fashion_mnist_from_the_debian_package() {
    // scripts/setup (run by the README test command and CI) installs dataset-fashion-mnist.
    let (train, test) = kiln_data::load_fashion_mnist(None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((train.len(), test.len(), train.image), (60_000, 10_000, Some([1, 28, 28])));
    assert_eq!(train.num_classes(), Some(10));
}

#[test]
fn corrupt_idx_in_data_dir_names_the_file() {
    let dir = temp_dir("idx");
    for stem in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::write(dir.join(stem), [0u8, 0, 8, 3, 0, 0, 0, 9]).unwrap();
    }
    let e = kiln_data::load_fashion_mnist(Some(&dir)).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte") && e.contains("header"), "{e}");
    let e = kiln_data::parse_idx("x.idx", &[0, 0, 9, 1, 0, 0, 0, 1, 5]).unwrap_err().to_string();
    assert!(e.contains("x.idx") && e.contains("unsigned byte"), "{e}");
    let e = kiln_data::parse_idx("y.idx", &[0, 0, 8, 1, 0, 0, 0, 5, 1, 2]).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    let e = kiln_data::parse_idx("z.idx", &[7, 7, 8, 1]).unwrap_err().to_string();
    assert!(e.contains("magic"), "{e}");
}
