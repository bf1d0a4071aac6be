//! The IDX format of MNIST and Fashion-MNIST: a big-endian header (magic 0x0000 0x08 ndim, then ndim u32
//! dimensions) followed by unsigned bytes. Gzip-compressed files are recognised by their magic and inflated.

use std::path::Path;

use crate::error::{DataError, Result};

/// A decoded IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn corrupt<T>(file: &str, problem: impl Into<String>) -> Result<T> {
    Err(DataError::Corrupt { file: file.into(), problem: problem.into() })
}

/// Parses IDX bytes (gzip or raw). `file` names the source in errors.
pub fn parse_idx(file: &str, bytes: &[u8]) -> Result<IdxArray> {
    let inflated;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        inflated = crate::loaders::gunzip(file, bytes)?;
        &inflated[..]
    } else {
        bytes
    };
    if bytes.len() < 4 {
        return corrupt(file, format!("{} bytes: too short for an IDX header", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return corrupt(file, format!("wrong magic {:02x}{:02x}{:02x}{:02x}: not an IDX file", bytes[0], bytes[1], bytes[2], bytes[3]));
    }
    if bytes[2] != 0x08 {
        return corrupt(file, format!("element type 0x{:02x} is not unsigned byte (0x08)", bytes[2]));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || ndim > 4 {
        return corrupt(file, format!("{ndim} dimensions (expected 1 to 4)"));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return corrupt(file, format!("header cut short: {} bytes, {header} needed for {ndim} dimensions", bytes.len()));
    }
    let dims: Vec<usize> = (0..ndim).map(|i| u32::from_be_bytes([bytes[4 + 4 * i], bytes[5 + 4 * i], bytes[6 + 4 * i], bytes[7 + 4 * i]]) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let Some(expected) = expected.filter(|&e| e <= 1 << 34) else {
        return corrupt(file, format!("dimensions {dims:?} are implausibly large"));
    };
    let body = &bytes[header..];
    if body.len() < expected {
        return corrupt(file, format!("dimensions {dims:?} need {expected} bytes of data, the file has {} (truncated)", body.len()));
    }
    if body.len() > expected {
        return corrupt(file, format!("dimensions {dims:?} need {expected} bytes of data, the file has {} (trailing bytes)", body.len()));
    }
    Ok(IdxArray { dims, data: body.to_vec() })
}

/// Reads and parses an IDX file.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Io { file: path.display().to_string(), source: e })?;
    parse_idx(&path.display().to_string(), &bytes)
}
