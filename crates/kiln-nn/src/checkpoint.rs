//! Checkpoints in the safetensors format (an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the raw little-endian data), so a PyTorch user can open them with
//! `safetensors.torch.load_file`. Writes are atomic: a temporary file in the same folder, fsync, rename.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint {file}: {problem}")]
    Corrupt { file: String, problem: String },
    #[error("checkpoint {file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("checkpoint {file}: tensor {name} has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch { file: String, name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("checkpoint {file}: no tensor named {name} (it has: {available})")]
    Missing { file: String, name: String, available: String },
    #[error(transparent)]
    Graph(#[from] kiln_graph::KilnError),
}

/// One named f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One named int64 tensor (PyTorch's counters, such as batch norm's `num_batches_tracked`).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedInts {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// A decoded checkpoint: f32 tensors in file order, int64 ones, and the free-form string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    pub tensors: Vec<NamedTensor>,
    pub int64: Vec<NamedInts>,
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Serialises to safetensors bytes (the f32 tensors, then the int64 ones; the header is padded to 8 bytes as the
/// format recommends).
pub fn to_bytes(ck: &Checkpoint) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !ck.metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(&ck.metadata).unwrap_or_default());
    }
    let mut at = 0usize;
    for t in &ck.tensors {
        let end = at + 4 * t.data.len();
        header.insert(t.name.clone(), serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [at, end] }));
        at = end;
    }
    for t in &ck.int64 {
        let end = at + 8 * t.data.len();
        header.insert(t.name.clone(), serde_json::json!({ "dtype": "I64", "shape": t.shape, "data_offsets": [at, end] }));
        at = end;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + at);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for t in &ck.tensors {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    for t in &ck.int64 {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Parses safetensors bytes; every inconsistency is an error naming `file` and the problem.
pub fn from_bytes(file: &str, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let bad = |problem: String| CheckpointError::Corrupt { file: file.into(), problem };
    if bytes.len() < 8 {
        return Err(bad(format!("{} bytes: too short for a safetensors header", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if n > bytes.len() - 8 {
        return Err(bad(format!("header length {n} exceeds the file ({} bytes): truncated or not safetensors", bytes.len())));
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data = &bytes[8 + n..];
    let mut ck = Checkpoint::default();
    let mut ranges = Vec::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            let m = entry.as_object().ok_or_else(|| bad("__metadata__ is not an object".into()))?;
            for (k, v) in m {
                ck.metadata.insert(k.clone(), v.as_str().ok_or_else(|| bad(format!("metadata {k} is not a string")))?.to_string());
            }
            continue;
        }
        let dtype = entry.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad(format!("tensor {name} has no dtype")))?;
        let width = match dtype {
            "F32" => 4,
            "I64" => 8,
            _ => return Err(bad(format!("tensor {name} has dtype {dtype}; Kiln reads F32 (and I64 counters)"))),
        };
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad(format!("tensor {name} has no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|v| v as usize).ok_or_else(|| bad(format!("tensor {name} has a non-integer dimension"))))
            .collect::<Result<_, _>>()?;
        let offs = entry.get("data_offsets").and_then(|o| o.as_array()).filter(|o| o.len() == 2).ok_or_else(|| bad(format!("tensor {name} has no data_offsets pair")))?;
        let (start, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) => (s as usize, e as usize),
            _ => return Err(bad(format!("tensor {name} has non-integer data_offsets"))),
        };
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} overflows")))?;
        if end < start || end > data.len() {
            return Err(bad(format!("tensor {name}: bytes {start}..{end} lie outside the {} data bytes (truncated?)", data.len())));
        }
        if end - start != numel.saturating_mul(width) {
            return Err(bad(format!("tensor {name}: shape {shape:?} of {dtype} needs {} bytes, data_offsets give {}", numel.saturating_mul(width), end - start)));
        }
        ranges.push((start, end, name.clone()));
        if width == 8 {
            let values = data[start..end].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
            ck.int64.push(NamedInts { name: name.clone(), shape, data: values });
            continue;
        }
        let values = data[start..end].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        ck.tensors.push(NamedTensor { name: name.clone(), shape, data: values });
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("tensors {} and {} overlap", w[0].2, w[1].2)));
        }
    }
    // Keep file order (by offset), as written.
    ck.tensors.sort_by_key(|t| ranges.iter().find(|r| r.2 == t.name).map(|r| r.0).unwrap_or(0));
    ck.int64.sort_by_key(|t| ranges.iter().find(|r| r.2 == t.name).map(|r| r.0).unwrap_or(0));
    Ok(ck)
}

/// Writes atomically: `<path>.tmp` in the same folder, fsync, rename over `path`, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |e: std::io::Error| CheckpointError::Io { file: path.display().to_string(), source: e };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn save(path: &Path, ck: &Checkpoint) -> Result<(), CheckpointError> {
    write_atomic(path, &to_bytes(ck))
}

pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io { file: path.display().to_string(), source: e })?;
    from_bytes(&path.display().to_string(), &bytes)
}
