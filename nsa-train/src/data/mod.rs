//! Training data: three sources behind one trait.
//!
//! - [`synthetic`]: the long-context tasks `needle` and `recall` (the default; no files).
//! - [`files`]: raw text files as byte tokens (vocab 256), and pre-tokenized shards (llm.c's
//!   `.bin` format or nanoGPT's headerless uint16), memory-mapped.
//!
//! A file source whose `data.path` is a folder holding `train/` and `val/` (the layout `nsa-train
//! prepare` and `cargo xtask corpus` write) trains on `train/` and evaluates on `val/`
//! ([`Split`]); a folder with only `train/` serves it to both, as any other path serves itself,
//! held-out batches then being other random windows of the same files (drawn with another seed).
//!
//! Every batch is a pure function of (seed, step, rank): a resumed run, or rank r of a
//! data-parallel run, reads exactly the batches it would have read otherwise.
pub(crate) mod files;
mod synthetic;

use std::path::{Path, PathBuf};

#[cfg(test)]
pub use files::shard_layout;
use files::{BinShards, TextBytes};
use synthetic::{Synthetic, Task};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Target value that the loss ignores (positions that are not answers).
pub const IGNORE: i64 = -100;

/// One batch: `input` and `target` are `[B, S]` int64; `target` is [`IGNORE`] where not scored.
#[derive(Debug)]
pub struct Batch {
    pub input: Tensor,
    pub target: Tensor,
}

impl Batch {
    pub fn to(&self, device: Device) -> Result<Batch> {
        Ok(Batch {
            input: self.input.f_to_device(device)?,
            target: self.target.f_to_device(device)?,
        })
    }
}

/// A deterministic source of batches.
pub trait TokenSource: Send + std::fmt::Debug {
    /// The batch for (`step`, `rank`), `batch` sequences of `seq_len` tokens, on the CPU.
    fn batch(&self, step: u64, rank: u64, batch: usize, seq_len: usize) -> Result<Batch>;
    /// Smallest vocabulary the tokens fit in.
    fn vocab_needed(&self) -> i64;
    /// Short description for logs.
    fn describe(&self) -> String;
}

/// `data.source`: where the batches come from. Written `needle`, `recall`, `text` or `bin`;
/// anything else is an error that lists these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// Synthetic: find the value after a key planted once in noise (no files).
    Needle,
    /// Synthetic: recall the values of `data.recall_pairs` (key, value) pairs (no files).
    Recall,
    /// The bytes of the text files under `data.path` (vocabulary 256).
    Text,
    /// Pre-tokenized shards under `data.path`, laid out as `data.format` says.
    Bin,
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataSource::Needle => "needle",
            DataSource::Recall => "recall",
            DataSource::Text => "text",
            DataSource::Bin => "bin",
        })
    }
}

/// `data.format`: how a `bin` shard stores its tokens. Written `llmc` or `raw-u16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShardFormat {
    /// llm.c's `.bin`: a 1024-byte header (magic, version, token count, checked), then uint16
    /// or uint32 tokens.
    Llmc,
    /// nanoGPT's headerless little-endian uint16 tokens.
    RawU16,
}

impl std::fmt::Display for ShardFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShardFormat::Llmc => "llmc",
            ShardFormat::RawU16 => "raw-u16",
        })
    }
}

/// Which source, as written in the config's `[data]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub source: DataSource,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Files for `text` / `bin` (a file or a folder of files).
    pub path: Option<PathBuf>,
    /// For `bin`: the shards' layout.
    pub format: ShardFormat,
    /// For `recall`: number of (key, value) pairs per sequence.
    pub recall_pairs: usize,
    /// For `recall`: the most filler tokens between the block of pairs and the block of
    /// queries (each sequence draws its gap uniformly from 0 to this, capped by the context).
    /// 0: the two blocks are adjacent and the filler may hold keys (the original layout); above
    /// 0, keys, values and filler come from disjoint thirds of the vocabulary.
    pub recall_distance: usize,
    /// For `recall` with a distance: training steps over which the largest gap grows linearly
    /// from 0 to `recall_distance` (a curriculum; 0: the full distance from the start).
    /// Held-out batches always use the full distance, and end with the queries.
    pub recall_curriculum_steps: u64,
    /// The tokenizer that made the `bin` shards (a `tokenizer.json`): copied into the run folder
    /// at start, so `generate` and `eval` encode and decode text. Its vocabulary must fit
    /// `model.vocab_size`.
    pub tokenizer: Option<PathBuf>,
    /// Seed offset for held-out evaluation batches (evaluation uses seed + this).
    pub eval_seed_offset: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: DataSource::Needle,
            seq_len: 256,
            batch_size: 16,
            path: None,
            format: ShardFormat::Llmc,
            recall_pairs: 8,
            recall_distance: 0,
            recall_curriculum_steps: 0,
            tokenizer: None,
            eval_seed_offset: 1_000_003,
        }
    }
}

/// Which side of the data a source serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training batches.
    Train,
    /// Held-out evaluation (`eval_loss`, `nsa-train eval`): `val/` where the data has one.
    Val,
}

/// The folder or file a file source of `split` reads: `path/train` or `path/val` when `path`
/// holds both (the prepared layout); `path/train` for both when it holds only that (`prepare`
/// without a validation split); else `path` itself.
pub fn split_path(path: &Path, split: Split) -> PathBuf {
    let (train, val) = (path.join("train"), path.join("val"));
    match (path.is_dir() && train.is_dir(), val.is_dir()) {
        (true, true) if split == Split::Val => val,
        (true, _) => train,
        _ => path.to_path_buf(),
    }
}

/// Builds the source the config names for `split`. `vocab` is the model's vocabulary size.
pub fn open(cfg: &DataConfig, vocab: i64, seed: u64, split: Split) -> Result<Box<dyn TokenSource>> {
    ensure!(
        cfg.seq_len >= 2,
        "data.seq_len must be at least 2 (got {})",
        cfg.seq_len
    );
    ensure!(cfg.batch_size >= 1, "data.batch_size must be at least 1");
    let synthetic = |task, pairs| Synthetic {
        task,
        vocab,
        seed,
        pairs,
        distance: cfg.recall_distance,
        curriculum_steps: match split {
            Split::Train => cfg.recall_curriculum_steps,
            Split::Val => 0,
        },
        queries_last: split == Split::Val,
    };
    let src: Box<dyn TokenSource> = match cfg.source {
        DataSource::Needle => Box::new(synthetic(Task::Needle, 1)),
        DataSource::Recall => {
            ensure!(
                cfg.recall_pairs >= 1,
                "data.recall_pairs must be at least 1"
            );
            Box::new(synthetic(Task::Recall, cfg.recall_pairs))
        }
        DataSource::Text => Box::new(TextBytes::open(&split_path(need_path(cfg)?, split), seed)?),
        DataSource::Bin => Box::new(BinShards::open(
            &split_path(need_path(cfg)?, split),
            cfg.format,
            seed,
        )?),
    };
    ensure!(
        src.vocab_needed() <= vocab,
        "data source {} needs a vocabulary of {} but model.vocab_size is {vocab}",
        src.describe(),
        src.vocab_needed()
    );
    Ok(src)
}

fn need_path(cfg: &DataConfig) -> Result<&Path> {
    cfg.path
        .as_deref()
        .with_context(|| format!("data.source = \"{}\" needs data.path", cfg.source))
}

/// SplitMix64: a tiny, well-mixed generator; batches must not depend on libtorch's global RNG.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(parts: &[u64]) -> Self {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        for p in parts {
            r.0 ^= p.wrapping_mul(0xD1B5_4A32_D192_ED03);
            r.next();
        }
        r
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// Accuracy of argmax predictions on scored positions: (correct, scored).
pub fn answer_accuracy(logits: &Tensor, target: &Tensor) -> Result<(i64, i64)> {
    let mask = target.f_ne(IGNORE)?;
    let pred = logits.f_argmax(-1, false)?;
    let correct = pred
        .f_eq_tensor(target)?
        .f_logical_and(&mask)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    Ok((correct, mask.f_sum(Kind::Int64)?.f_int64_value(&[])?))
}

#[cfg(test)]
mod tests {
    use super::synthetic::{NEEDLE, QUERY};
    use super::*;

    fn vec_of(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn batches_are_a_function_of_seed_step_rank() {
        let cfg = DataConfig {
            seq_len: 64,
            batch_size: 3,
            ..Default::default()
        };
        for source in [DataSource::Needle, DataSource::Recall] {
            let cfg = DataConfig {
                source,
                ..cfg.clone()
            };
            let a = open(&cfg, 64, 7, Split::Train).unwrap();
            let b = open(&cfg, 64, 7, Split::Train).unwrap();
            let x = a.batch(5, 1, 3, 64).unwrap();
            assert_eq!(
                vec_of(&x.input),
                vec_of(&b.batch(5, 1, 3, 64).unwrap().input)
            );
            assert_ne!(
                vec_of(&x.input),
                vec_of(&a.batch(6, 1, 3, 64).unwrap().input)
            );
            assert_ne!(
                vec_of(&x.input),
                vec_of(&a.batch(5, 0, 3, 64).unwrap().input)
            );
        }
    }

    #[test]
    fn needle_answer_is_the_value_after_the_key() {
        let cfg = DataConfig {
            seq_len: 40,
            ..Default::default()
        };
        let src = open(&cfg, 32, 1, Split::Train).unwrap();
        let b = src.batch(0, 0, 4, 40).unwrap();
        let (inp, tgt) = (vec_of(&b.input), vec_of(&b.target));
        for r in 0..4 {
            let row = &inp[r * 40..(r + 1) * 40];
            let trow = &tgt[r * 40..(r + 1) * 40];
            let scored: Vec<usize> = (0..40).filter(|&t| trow[t] != IGNORE).collect();
            assert_eq!(scored, vec![39]);
            assert_eq!(row[38], QUERY);
            let key = row[39];
            let at = (0..37)
                .find(|&t| row[t] == NEEDLE && row[t + 1] == key)
                .expect("needle present");
            assert_eq!(trow[39], row[at + 2]);
        }
    }

    #[test]
    fn recall_scores_every_queried_value() {
        let cfg = DataConfig {
            source: DataSource::Recall,
            seq_len: 64,
            recall_pairs: 6,
            ..Default::default()
        };
        let src = open(&cfg, 64, 3, Split::Train).unwrap();
        let b = src.batch(2, 0, 2, 64).unwrap();
        let tgt = vec_of(&b.target);
        assert_eq!(tgt.iter().filter(|&&t| t != IGNORE).count(), 12);
    }

    #[test]
    fn too_small_vocab_or_sequence_is_an_error() {
        let cfg = DataConfig {
            source: DataSource::Recall,
            seq_len: 64,
            recall_pairs: 40,
            ..Default::default()
        };
        assert!(open(&cfg, 32, 0, Split::Train)
            .unwrap_err()
            .to_string()
            .contains("vocab"));
        let cfg = DataConfig {
            source: DataSource::Text,
            ..Default::default()
        };
        assert!(open(&cfg, 256, 0, Split::Train)
            .unwrap_err()
            .to_string()
            .contains("needs data.path"));
    }

    /// A prepared folder trains on train/ and evaluates on val/; one without val/ serves train/
    /// to both; a plain folder serves itself.
    #[test]
    fn splits_read_their_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (sub, text) in [
            ("train", "abcdefghijklmnopqrst"),
            ("val", "ABCDEFGHIJKLMNOPQRST"),
        ] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
            std::fs::write(root.join(sub).join("x.txt"), text).unwrap();
        }
        let cfg = DataConfig {
            source: DataSource::Text,
            path: Some(root.to_path_buf()),
            seq_len: 8,
            ..Default::default()
        };
        let first = |split| {
            let src = open(&cfg, 256, 0, split).unwrap();
            assert!(src.describe().contains(match split {
                Split::Train => "train",
                Split::Val => "val",
            }));
            vec_of(&src.batch(0, 0, 4, 8).unwrap().input)
        };
        assert!(first(Split::Train)
            .iter()
            .all(|&t| (b'a' as i64..=b'z' as i64).contains(&t)));
        assert!(first(Split::Val)
            .iter()
            .all(|&t| (b'A' as i64..=b'Z' as i64).contains(&t)));
        assert_eq!(split_path(root, Split::Val), root.join("val"));
        std::fs::remove_dir_all(root.join("val")).unwrap();
        assert_eq!(split_path(root, Split::Val), root.join("train"));
        let plain = root.join("train");
        assert_eq!(split_path(&plain, Split::Val), plain);
    }

    #[test]
    fn windows_come_from_the_file() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        std::fs::write(&f, b"abcdefghijklmnopqrstuvwxyz").unwrap();
        let cfg = DataConfig {
            source: DataSource::Text,
            path: Some(f),
            seq_len: 8,
            ..Default::default()
        };
        let src = open(&cfg, 256, 0, Split::Train).unwrap();
        let b = src.batch(0, 0, 2, 8).unwrap();
        let (i, t) = (vec_of(&b.input), vec_of(&b.target));
        for k in 0..16 {
            if k % 8 != 7 {
                assert_eq!(i[k + 1], t[k]);
            }
            assert!((b'a' as i64..=b'z' as i64).contains(&i[k]));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
