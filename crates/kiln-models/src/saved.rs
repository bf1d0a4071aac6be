//! Reading back a model checkpoint that names its model and sizes in its metadata (`kiln.model` and the
//! like): what the YOLO, two-stage and segmentation loaders share, with errors that name the file.

use kiln_graph::{KilnError, Result};
use kiln_nn::VarStore;

/// A checkpoint checked to hold `model`, whose metadata is read by key.
pub struct SavedModel {
    pub file: String,
    pub ck: kiln_nn::checkpoint::Checkpoint,
    /// What the file should be, for errors ("a YOLO checkpoint of `kiln train yolo`").
    what: &'static str,
}

impl SavedModel {
    /// Loads `path` and checks its `kiln.model` is `model`.
    pub fn open(path: &std::path::Path, model: &str, what: &'static str) -> Result<SavedModel> {
        let file = path.display().to_string();
        let ck = kiln_nn::checkpoint::load(path).map_err(|e| KilnError::Checkpoint(e.to_string()))?;
        let saved = SavedModel { file, ck, what };
        let holds = saved.meta("kiln.model")?;
        if holds != model {
            return Err(saved.bad(&format!("it holds a {holds:?}")));
        }
        Ok(saved)
    }

    /// An error naming the file, what it should be, and `problem`.
    pub fn bad(&self, problem: &str) -> KilnError {
        KilnError::Checkpoint(format!("{}: not {} ({problem})", self.file, self.what))
    }

    pub fn meta(&self, key: &str) -> Result<String> {
        self.ck.metadata.get(key).cloned().ok_or_else(|| self.bad(&format!("no {key} in its metadata")))
    }

    pub fn number(&self, key: &str) -> Result<usize> {
        self.meta(key)?.parse().map_err(|_| self.bad(&format!("{key} is not a number")))
    }

    /// A true/false setting; false when the key is absent (checkpoints from before the setting existed).
    pub fn flag(&self, key: &str) -> Result<bool> {
        match self.ck.metadata.get(key).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(self.bad(&format!("{key} is {other:?}, not true or false"))),
        }
    }

    /// The weights into a finished store built for them (every name and shape must match).
    pub fn load_into(&self, vs: &VarStore) -> Result<()> {
        vs.load_checkpoint(&self.file, &self.ck, true, |_| true).map(drop).map_err(|e| KilnError::Checkpoint(e.to_string()))
    }
}
