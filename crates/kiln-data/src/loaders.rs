//! Loaders for the bundled scikit-learn data sets. The files are embedded at build time; `KILN_DATA` (or the
//! CLI's `--data-dir`) points at a folder with the same file names to read other copies instead.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::{Dataset, Targets};
use crate::error::{DataError, Result};

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
pub const DATASETS: [(&str, &str); 5] = [
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
pub fn parse_sklearn_csv(file: &str, bytes: &[u8], name: &str) -> Result<Dataset> {
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
    Ok(Dataset { name: name.into(), x, features: d, targets: Targets::Classes { labels, names } })
}

pub fn load_breast_cancer(dir: Option<&Path>) -> Result<Dataset> {
    let (file, bytes) = read(BREAST_CANCER, dir)?;
    parse_sklearn_csv(&file, &bytes, "breast-cancer")
}

pub fn load_iris(dir: Option<&Path>) -> Result<Dataset> {
    let (file, bytes) = read(IRIS, dir)?;
    parse_sklearn_csv(&file, &bytes, "iris")
}

pub fn load_wine(dir: Option<&Path>) -> Result<Dataset> {
    let (file, bytes) = read(WINE, dir)?;
    parse_sklearn_csv(&file, &bytes, "wine")
}

/// 1797 digits: 64 grey levels (0..16) then the label, no header.
pub fn load_digits(dir: Option<&Path>) -> Result<Dataset> {
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
    Ok(Dataset { name: "digits".into(), x, features: 64, targets: Targets::Classes { labels, names } })
}

/// 442 patients, 10 raw features (age, sex, bmi, bp, s1..s6), target: disease progression after one year.
pub fn load_diabetes(dir: Option<&Path>) -> Result<Dataset> {
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
    Ok(Dataset { name: "diabetes".into(), x, features: 10, targets: Targets::Values(y) })
}

/// A data set by name (see [`DATASETS`]): files from `dir` (or `KILN_DATA`) when present there, else the
/// bundled copies.
pub fn load(name: &str, dir: Option<&Path>) -> Result<Dataset> {
    match name {
        "digits" => load_digits(dir),
        "breast-cancer" | "breast_cancer" => load_breast_cancer(dir),
        "iris" => load_iris(dir),
        "wine" => load_wine(dir),
        "diabetes" => load_diabetes(dir),
        _ => Err(DataError::Unknown { name: name.into(), available: DATASETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ") }),
    }
}
