use thiserror::Error;

/// Data errors name the file and what is wrong with it.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("{file}: {problem}")]
    Corrupt { file: String, problem: String },
    #[error("{file}: line {line}: {problem}")]
    Parse { file: String, line: usize, problem: String },
    #[error("cannot read {file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("unknown data set {name:?}; available: {available}")]
    Unknown { name: String, available: String },
    #[error("{what} not found (looked in: {searched}); {how}")]
    Missing { what: String, searched: String, how: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
