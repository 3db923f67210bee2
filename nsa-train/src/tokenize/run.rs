//! The tokenizer a run records: `data.tokenizer` names a `tokenizer.json` (ours or any other,
//! e.g. GPT-2's); at the start of training it is checked against the model and the data and
//! copied into the run folder as [`FILE_NAME`], from where `generate` and `eval` load it.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::data::{DataConfig, DataSource};

/// The tokenizer's name inside a run folder.
pub const FILE_NAME: &str = "tokenizer.json";

/// A checked `data.tokenizer`: its bytes, copied as they are.
#[derive(Debug)]
pub struct RunTokenizer {
    pub path: PathBuf,
    bytes: Vec<u8>,
}

impl RunTokenizer {
    /// The run's tokenizer, if `data.tokenizer` names one: it must load, go with token shards
    /// (`data.source = "bin"`; the `text` source reads bytes, the synthetic tasks their own
    /// ids), fit `model.vocab_size` and know every id of the shards (`max_id`, the largest
    /// token the training data holds).
    pub fn check(data: &DataConfig, model_vocab: i64, max_id: i64) -> Result<Option<Self>> {
        let Some(path) = &data.tokenizer else {
            return Ok(None);
        };
        ensure!(
            data.source == DataSource::Bin,
            "data.tokenizer goes with data.source = \"bin\" (token shards); \"{}\" has its own \
             tokens (\"text\" reads bytes, ids 0-255): remove data.tokenizer",
            data.source
        );
        let bytes = std::fs::read(path)
            .with_context(|| format!("data.tokenizer: reading {}", path.display()))?;
        let tokenizer = super::load(path).context("data.tokenizer")?;
        let vocab = tokenizer.get_vocab_size(true);
        check_vocab(path, vocab, model_vocab)?;
        ensure!(
            max_id < vocab as i64,
            "data.tokenizer {} has {vocab} tokens, but the training data holds id {max_id}: \
             these shards were made with another tokenizer",
            path.display()
        );
        Ok(Some(RunTokenizer {
            path: path.clone(),
            bytes,
        }))
    }

    /// Writes the tokenizer into `run_dir` as [`FILE_NAME`] (whole or not at all).
    pub fn copy_into(&self, run_dir: &Path) -> Result<()> {
        crate::write_atomic(&run_dir.join(FILE_NAME), &self.bytes)
            .with_context(|| format!("copying {} into the run folder", self.path.display()))
    }
}

/// A tokenizer's vocabulary must fit the model's: an id past `model.vocab_size` has no
/// embedding.
pub fn check_vocab(path: &Path, vocab: usize, model_vocab: i64) -> Result<()> {
    if vocab as i64 > model_vocab {
        bail!(
            "tokenizer {} has {vocab} tokens but model.vocab_size is {model_vocab}: set \
             model.vocab_size to at least {vocab}",
            path.display()
        );
    }
    Ok(())
}
