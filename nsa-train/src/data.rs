//! Training data: three sources behind one trait.
//!
//! - **Synthetic long-context tasks** (the default; no files): `needle` — one (key, value) pair
//!   hidden at a random depth in random filler, asked for at the end — and `recall` — multi-query
//!   associative recall: many (key, value) pairs, then the keys again in another order. Both score
//!   only the answer tokens, so the loss and the accuracy measure retrieval, which is what NSA's
//!   selected branch is for.
//! - **Raw text files**: byte-level tokens (vocab 256), random windows.
//! - **Pre-tokenized shards** (`.bin`): llm.c's layout (a 256 × int32 header: magic 20240520 with
//!   version 1 → uint16 tokens, or magic 20240801 with version 7 → uint32 tokens; header[2] is the
//!   token count), or nanoGPT's headerless uint16 files (`format = "raw-u16"`).
//!
//! Every batch is a pure function of (seed, step, rank): a resumed run, or rank r of a
//! data-parallel run, reads exactly the batches it would have read otherwise.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
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
    pub fn to(&self, device: Device) -> Batch {
        Batch {
            input: self.input.to(device),
            target: self.target.to(device),
        }
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

/// Which source, as written in the config's `[data]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `needle` | `recall` | `text` | `bin`.
    pub source: String,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Files for `text` / `bin` (a file or a folder of files).
    pub path: Option<PathBuf>,
    /// For `bin`: `llmc` (header checked) or `raw-u16` (nanoGPT).
    pub format: String,
    /// For `recall`: number of (key, value) pairs per sequence.
    pub recall_pairs: usize,
    /// Seed offset for held-out evaluation batches (evaluation uses seed + this).
    pub eval_seed_offset: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: "needle".into(),
            seq_len: 256,
            batch_size: 16,
            path: None,
            format: "llmc".into(),
            recall_pairs: 8,
            eval_seed_offset: 1_000_003,
        }
    }
}

/// Builds the source the config names. `vocab` is the model's vocabulary size.
pub fn open(cfg: &DataConfig, vocab: i64, seed: u64) -> Result<Box<dyn TokenSource>> {
    ensure!(
        cfg.seq_len >= 2,
        "data.seq_len must be at least 2 (got {})",
        cfg.seq_len
    );
    ensure!(cfg.batch_size >= 1, "data.batch_size must be at least 1");
    let src: Box<dyn TokenSource> = match cfg.source.as_str() {
        "needle" => Box::new(Synthetic {
            task: Task::Needle,
            vocab,
            seed,
            pairs: 1,
        }),
        "recall" => {
            ensure!(
                cfg.recall_pairs >= 1,
                "data.recall_pairs must be at least 1"
            );
            Box::new(Synthetic {
                task: Task::Recall,
                vocab,
                seed,
                pairs: cfg.recall_pairs,
            })
        }
        "text" => Box::new(TextBytes::open(need_path(cfg)?, seed)?),
        "bin" => Box::new(BinShards::open(need_path(cfg)?, &cfg.format, seed)?),
        other => bail!("data.source must be needle, recall, text or bin (got {other:?})"),
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
        .with_context(|| format!("data.source = {:?} needs data.path", cfg.source))
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Task {
    Needle,
    Recall,
}

/// Reserved token ids of the synthetic tasks.
const NEEDLE: i64 = 1;
const QUERY: i64 = 2;
const FIRST_FREE: i64 = 3;

#[derive(Debug)]
struct Synthetic {
    task: Task,
    vocab: i64,
    seed: u64,
    pairs: usize,
}

impl Synthetic {
    /// Keys and values come from disjoint halves of the free ids; filler from all free ids.
    fn ranges(&self) -> ((i64, i64), (i64, i64)) {
        let free = self.vocab - FIRST_FREE;
        let half = free / 2;
        (
            (FIRST_FREE, FIRST_FREE + half),
            (FIRST_FREE + half, self.vocab),
        )
    }

    fn sequence(
        &self,
        rng: &mut Rng,
        s: usize,
        tokens: &mut [i64],
        target: &mut [i64],
    ) -> Result<()> {
        let ((k0, k1), (v0, v1)) = self.ranges();
        let draw = |rng: &mut Rng, lo: i64, hi: i64| lo + rng.below((hi - lo) as u64) as i64;
        // The sequence is seq_len + 1 tokens; input = [..s], target = [1..].
        let mut seq = vec![0i64; s + 1];
        let mut scored = vec![false; s + 1];
        match self.task {
            Task::Needle => {
                ensure!(s + 1 >= 8, "needle task needs seq_len >= 7");
                for t in seq.iter_mut() {
                    *t = draw(rng, FIRST_FREE, self.vocab);
                }
                let (key, value) = (draw(rng, k0, k1), draw(rng, v0, v1));
                // Needle somewhere in the first s - 4 tokens; the question at the very end.
                let at = rng.below((s + 1 - 6) as u64) as usize;
                seq[at..at + 3].copy_from_slice(&[NEEDLE, key, value]);
                let q = s + 1 - 3;
                seq[q..].copy_from_slice(&[QUERY, key, value]);
                scored[s] = true;
            }
            Task::Recall => {
                let n = self.pairs;
                ensure!(
                    (k1 - k0) as usize >= n,
                    "recall with {n} pairs needs at least {n} distinct keys: raise model.vocab_size"
                );
                ensure!(
                    s + 1 > 4 * n,
                    "recall with {n} pairs needs seq_len >= {}",
                    4 * n
                );
                // Distinct keys (partial Fisher-Yates over the key range).
                let mut keys: Vec<i64> = (k0..k1).collect();
                for i in 0..n {
                    let j = i + rng.below((keys.len() - i) as u64) as usize;
                    keys.swap(i, j);
                }
                let values: Vec<i64> = (0..n).map(|_| draw(rng, v0, v1)).collect();
                // Filler before the pairs, so the pairs sit at a random depth.
                let body = 4 * n;
                let lead = s + 1 - body;
                for t in seq.iter_mut().take(lead) {
                    *t = draw(rng, FIRST_FREE, self.vocab);
                }
                for i in 0..n {
                    seq[lead + 2 * i] = keys[i];
                    seq[lead + 2 * i + 1] = values[i];
                }
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let qbase = lead + 2 * n;
                for (j, &i) in order.iter().enumerate() {
                    seq[qbase + 2 * j] = keys[i];
                    seq[qbase + 2 * j + 1] = values[i];
                    scored[qbase + 2 * j + 1] = true;
                }
            }
        }
        tokens.copy_from_slice(&seq[..s]);
        for t in 0..s {
            target[t] = if scored[t + 1] { seq[t + 1] } else { IGNORE };
        }
        Ok(())
    }
}

impl TokenSource for Synthetic {
    fn batch(&self, step: u64, rank: u64, batch: usize, s: usize) -> Result<Batch> {
        let mut tokens = vec![0i64; batch * s];
        let mut target = vec![0i64; batch * s];
        for b in 0..batch {
            let mut rng = Rng::new(&[self.seed, step, rank, b as u64]);
            self.sequence(
                &mut rng,
                s,
                &mut tokens[b * s..(b + 1) * s],
                &mut target[b * s..(b + 1) * s],
            )?;
        }
        let shape = [batch as i64, s as i64];
        Ok(Batch {
            input: Tensor::from_slice(&tokens).view(shape),
            target: Tensor::from_slice(&target).view(shape),
        })
    }
    fn vocab_needed(&self) -> i64 {
        // Keys and values need at least pairs distinct ids each.
        FIRST_FREE + 2 * (self.pairs as i64).max(2)
    }
    fn describe(&self) -> String {
        match self.task {
            Task::Needle => format!("needle (vocab {})", self.vocab),
            Task::Recall => format!("recall, {} pairs (vocab {})", self.pairs, self.vocab),
        }
    }
}

/// Every regular file under `path` (or `path` itself), sorted.
fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).with_context(|| format!("data.path {}", path.display()))?;
    let mut files = if meta.is_dir() {
        let mut v = Vec::new();
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if p.is_file() {
                v.push(p);
            }
        }
        v
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    ensure!(
        !files.is_empty(),
        "data.path {} holds no files",
        path.display()
    );
    Ok(files)
}

/// Random windows of a flat token array, scored everywhere (plain language modelling).
fn windows(tokens: &[i64], rng_parts: &[u64], batch: usize, s: usize) -> Result<Batch> {
    ensure!(
        tokens.len() > s + 1,
        "the data holds {} tokens, fewer than seq_len + 1 = {}",
        tokens.len(),
        s + 1
    );
    let mut input = Vec::with_capacity(batch * s);
    let mut target = Vec::with_capacity(batch * s);
    for b in 0..batch {
        let mut parts = rng_parts.to_vec();
        parts.push(b as u64);
        let mut rng = Rng::new(&parts);
        let at = rng.below((tokens.len() - s - 1) as u64) as usize;
        input.extend_from_slice(&tokens[at..at + s]);
        target.extend_from_slice(&tokens[at + 1..at + s + 1]);
    }
    let shape = [batch as i64, s as i64];
    Ok(Batch {
        input: Tensor::from_slice(&input).view(shape),
        target: Tensor::from_slice(&target).view(shape),
    })
}

#[derive(Debug)]
struct TextBytes {
    tokens: Vec<i64>,
    seed: u64,
    what: String,
}

impl TextBytes {
    fn open(path: &Path, seed: u64) -> Result<Self> {
        let mut tokens = Vec::new();
        let files = list_files(path)?;
        for f in &files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            tokens.extend(bytes.iter().map(|&b| b as i64));
        }
        Ok(TextBytes {
            what: format!("text bytes, {} files, {} tokens", files.len(), tokens.len()),
            tokens,
            seed,
        })
    }
}

impl TokenSource for TextBytes {
    fn batch(&self, step: u64, rank: u64, batch: usize, s: usize) -> Result<Batch> {
        windows(&self.tokens, &[self.seed, step, rank], batch, s)
    }
    fn vocab_needed(&self) -> i64 {
        256
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

#[derive(Debug)]
struct BinShards {
    tokens: Vec<i64>,
    max_token: i64,
    seed: u64,
    what: String,
}

/// llm.c's shard header: 256 little-endian int32.
const HEADER_INTS: usize = 256;
const MAGIC_U16: i32 = 20240520;
const MAGIC_U32: i32 = 20240801;

/// Parses one shard's bytes into tokens. `format` is `llmc` or `raw-u16`.
pub fn parse_shard(bytes: &[u8], format: &str, name: &str) -> Result<Vec<i64>> {
    let u16s = |b: &[u8]| -> Result<Vec<i64>> {
        ensure!(
            b.len().is_multiple_of(2),
            "{name}: odd number of bytes for uint16 tokens"
        );
        Ok(b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
            .collect())
    };
    match format {
        "raw-u16" => u16s(bytes),
        "llmc" => {
            ensure!(
                bytes.len() >= HEADER_INTS * 4,
                "{name}: {} bytes is shorter than llm.c's 1024-byte header (use data.format = \"raw-u16\" for headerless nanoGPT files)",
                bytes.len()
            );
            let h = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
            let (magic, version, count) = (h(0), h(1), h(2));
            let body = &bytes[HEADER_INTS * 4..];
            let (width, tokens) = match (magic, version) {
                (MAGIC_U16, 1) => (2, None),
                (MAGIC_U32, 7) => (4, Some(())),
                _ => bail!(
                    "{name}: header magic/version {magic}/{version} is not llm.c's ({MAGIC_U16}/1 for uint16, {MAGIC_U32}/7 for uint32)"
                ),
            };
            ensure!(count >= 0, "{name}: negative token count {count} in header");
            ensure!(
                body.len() == count as usize * width,
                "{name}: header says {count} tokens ({} bytes) but the file holds {} bytes after the header",
                count as usize * width,
                body.len()
            );
            match tokens {
                None => u16s(body),
                Some(()) => Ok(body
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect()),
            }
        }
        other => bail!("data.format must be llmc or raw-u16 (got {other:?})"),
    }
}

impl BinShards {
    fn open(path: &Path, format: &str, seed: u64) -> Result<Self> {
        let files = list_files(path)?;
        let mut tokens = Vec::new();
        for f in &files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            tokens.extend(parse_shard(&bytes, format, &f.display().to_string())?);
        }
        let max_token = tokens.iter().copied().max().unwrap_or(0);
        Ok(BinShards {
            what: format!("{} shards ({format}), {} tokens", files.len(), tokens.len()),
            tokens,
            max_token,
            seed,
        })
    }
}

impl TokenSource for BinShards {
    fn batch(&self, step: u64, rank: u64, batch: usize, s: usize) -> Result<Batch> {
        windows(&self.tokens, &[self.seed, step, rank], batch, s)
    }
    fn vocab_needed(&self) -> i64 {
        self.max_token + 1
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Accuracy of argmax predictions on scored positions: (correct, scored).
pub fn answer_accuracy(logits: &Tensor, target: &Tensor) -> (i64, i64) {
    let mask = target.ne(IGNORE);
    let pred = logits.argmax(-1, false);
    let correct = pred
        .eq_tensor(target)
        .logical_and(&mask)
        .sum(Kind::Int64)
        .int64_value(&[]);
    (correct, mask.sum(Kind::Int64).int64_value(&[]))
}

#[cfg(test)]
mod tests {
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
        for source in ["needle", "recall"] {
            let cfg = DataConfig {
                source: source.into(),
                ..cfg.clone()
            };
            let a = open(&cfg, 64, 7).unwrap();
            let b = open(&cfg, 64, 7).unwrap();
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
        let src = open(&cfg, 32, 1).unwrap();
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
            source: "recall".into(),
            seq_len: 64,
            recall_pairs: 6,
            ..Default::default()
        };
        let src = open(&cfg, 64, 3).unwrap();
        let b = src.batch(2, 0, 2, 64).unwrap();
        let tgt = vec_of(&b.target);
        assert_eq!(tgt.iter().filter(|&&t| t != IGNORE).count(), 12);
    }

    #[test]
    fn too_small_vocab_or_sequence_is_an_error() {
        let cfg = DataConfig {
            source: "recall".into(),
            seq_len: 64,
            recall_pairs: 40,
            ..Default::default()
        };
        assert!(open(&cfg, 32, 0).unwrap_err().to_string().contains("vocab"));
        let cfg = DataConfig {
            source: "bogus".into(),
            ..Default::default()
        };
        assert!(open(&cfg, 32, 0)
            .unwrap_err()
            .to_string()
            .contains("needle, recall, text or bin"));
        let cfg = DataConfig {
            source: "text".into(),
            ..Default::default()
        };
        assert!(open(&cfg, 256, 0)
            .unwrap_err()
            .to_string()
            .contains("needs data.path"));
    }

    fn llmc(magic: i32, version: i32, count: i32, body: &[u8]) -> Vec<u8> {
        let mut h = vec![0i32; HEADER_INTS];
        h[0] = magic;
        h[1] = version;
        h[2] = count;
        let mut out: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn llmc_shards_are_checked() {
        let body: Vec<u8> = [1u16, 2, 65535]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            parse_shard(&llmc(MAGIC_U16, 1, 3, &body), "llmc", "a").unwrap(),
            vec![1, 2, 65535]
        );
        let e = parse_shard(&llmc(MAGIC_U16, 1, 4, &body), "llmc", "a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("header says 4 tokens"), "{e}");
        let e = parse_shard(&llmc(123, 1, 3, &body), "llmc", "a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not llm.c's"), "{e}");
        let body32: Vec<u8> = [70000u32, 5].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            parse_shard(&llmc(MAGIC_U32, 7, 2, &body32), "llmc", "b").unwrap(),
            vec![70000, 5]
        );
        assert_eq!(
            parse_shard(&body, "raw-u16", "c").unwrap(),
            vec![1, 2, 65535]
        );
        assert!(parse_shard(&body[..3], "raw-u16", "c").is_err());
        assert!(parse_shard(&body, "llmc", "short")
            .unwrap_err()
            .to_string()
            .contains("header"));
    }

    #[test]
    fn windows_come_from_the_file() {
        let dir = std::env::temp_dir().join(format!("nsa-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        std::fs::write(&f, b"abcdefghijklmnopqrstuvwxyz").unwrap();
        let cfg = DataConfig {
            source: "text".into(),
            path: Some(f),
            seq_len: 8,
            ..Default::default()
        };
        let src = open(&cfg, 256, 0).unwrap();
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
