//! `nsa-train prepare`: text files → token shards in llm.c's format (`data.source = "bin"`).
//!
//! The text streams through in chunks ([`super::Chunks`]); batches of chunks are encoded in
//! parallel (the `tokenizers` crate's thread pool) and their tokens appended, in input order, to
//! the shard being written. Memory is bounded by one batch, whatever the corpus size. Each shard
//! is written under a temporary name and renamed when whole, so an interrupted run leaves only
//! whole shards.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::{bytes_bar, input_files, load, Chunks, END_OF_TEXT};
use crate::data::files::{HEADER_INTS, MAGIC_U16, MAGIC_U32};

/// Arguments of `nsa-train prepare`.
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// Text files, or folders whose files are all text (read in sorted order; each file is a
    /// document, preceded by the end-of-text token when the tokenizer has one). A folder that
    /// holds `train/` and `val/` (`cargo xtask corpus` writes one) keeps its split: its `val/`
    /// files go to `val/`, its `train/` files to `train/`.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The tokenizer (`nsa-train tokenizer train`'s, or any `tokenizer.json`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output folder (must not exist or be empty): `train/` and, with --val-tokens, `val/`.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per shard (llm.c's header holds the count as an int32).
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: u64,
    /// The first this many tokens of the stream go to `val/` (a deterministic split), the rest
    /// to `train/` (not with inputs that bring their own split).
    #[arg(long, default_value_t = 0)]
    pub val_tokens: u64,
    /// Chunks encoded together (each about 1 MiB of text).
    #[arg(long, default_value_t = 64)]
    pub batch_chunks: usize,
    /// Bytes of text per chunk (chunks are cut at line ends).
    #[arg(long, default_value_t = 1 << 20, hide = true)]
    pub chunk_bytes: usize,
    /// Draw a progress bar (off when stdout is not a terminal).
    #[arg(skip)]
    pub progress: bool,
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub shards: Vec<PathBuf>,
}

/// Writes consecutive shards `shard_NNNNNN.bin` of one split.
struct ShardWriter {
    dir: PathBuf,
    shard_tokens: u64,
    /// Bytes per token: 2 (uint16, vocabularies up to 65536) or 4 (uint32).
    width: usize,
    buf: Vec<u8>,
    count: u64,
    total: u64,
    written: Vec<PathBuf>,
}

impl ShardWriter {
    fn new(dir: PathBuf, shard_tokens: u64, width: usize) -> Self {
        ShardWriter {
            dir,
            shard_tokens,
            width,
            buf: Vec::new(),
            count: 0,
            total: 0,
            written: Vec::new(),
        }
    }

    fn push(&mut self, id: u32) -> Result<()> {
        if self.width == 2 {
            self.buf.extend_from_slice(&(id as u16).to_le_bytes());
        } else {
            self.buf.extend_from_slice(&id.to_le_bytes());
        }
        self.count += 1;
        self.total += 1;
        if self.count == self.shard_tokens {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the tokens gathered so far as the next shard (none when there are none).
    fn flush(&mut self) -> Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self
            .dir
            .join(format!("shard_{:06}.bin", self.written.len()));
        let (magic, version) = if self.width == 2 {
            (MAGIC_U16, 1)
        } else {
            (MAGIC_U32, 7)
        };
        let mut header = vec![0i32; HEADER_INTS];
        header[0] = magic;
        header[1] = version;
        header[2] = i32::try_from(self.count).context("shard token count over i32")?;
        let tmp = path.with_extension("bin.tmp");
        {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?,
            );
            for h in &header {
                f.write_all(&h.to_le_bytes())?;
            }
            f.write_all(&self.buf)?;
            f.into_inner()
                .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?
                .sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        self.written.push(path);
        self.buf.clear();
        self.count = 0;
        Ok(())
    }
}

/// Tokenizes the inputs into shards under `a.out` (see the module docs).
pub fn prepare(a: &PrepareArgs) -> Result<Prepared> {
    ensure!(
        a.shard_tokens >= 1 && a.shard_tokens <= i32::MAX as u64,
        "--shard-tokens must be between 1 and {} (llm.c's header holds an int32), got {}",
        i32::MAX,
        a.shard_tokens
    );
    ensure!(a.batch_chunks >= 1, "--batch-chunks must be at least 1");
    if a.out.exists() {
        let mut entries = std::fs::read_dir(&a.out)
            .with_context(|| format!("--out {} is not a folder", a.out.display()))?;
        if entries.next().is_some() {
            bail!(
                "--out {} is not empty: prepare writes only into a new or empty folder",
                a.out.display()
            );
        }
    }
    let tokenizer = load(&a.tokenizer)?;
    let vocab = tokenizer.get_vocab_size(true);
    let width = if vocab <= 1 << 16 { 2 } else { 4 };
    let eot = tokenizer.token_to_id(END_OF_TEXT);
    let (val_files, files) = split_inputs(&a.inputs)?;
    ensure!(
        val_files.is_empty() || a.val_tokens == 0,
        "--val-tokens {} with inputs that hold their own train/ and val/: use one split or the other",
        a.val_tokens
    );
    let total = super::total_bytes(&files)? + super::total_bytes(&val_files)?;
    let bar = bytes_bar(total, a.progress, "tokenizing");
    let mut val = ShardWriter::new(a.out.join("val"), a.shard_tokens, width);
    let mut train = ShardWriter::new(a.out.join("train"), a.shard_tokens, width);
    let encode = |files: Vec<PathBuf>, sink: &mut dyn FnMut(u32) -> Result<()>| -> Result<()> {
        let mut chunks = Chunks::new(files, a.chunk_bytes, bar.clone());
        loop {
            let mut batch = Vec::with_capacity(a.batch_chunks);
            while batch.len() < a.batch_chunks {
                match chunks.next_chunk()? {
                    Some(c) => batch.push(c),
                    None => break,
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            let texts: Vec<&str> = batch.iter().map(|c| c.text.as_str()).collect();
            let encoded = tokenizer
                .encode_batch(texts, false)
                .map_err(|e| anyhow!("tokenizing: {e}"))?;
            for (chunk, enc) in batch.iter().zip(&encoded) {
                let doc_start = eot.filter(|_| chunk.starts_document);
                for &id in doc_start.iter().chain(enc.get_ids()) {
                    ensure!(
                        (id as usize) < vocab,
                        "token id {id} outside the vocabulary of {vocab}"
                    );
                    sink(id)?;
                }
            }
        }
    };
    encode(val_files, &mut |id| val.push(id))?;
    encode(files, &mut |id| {
        if val.total < a.val_tokens {
            val.push(id)
        } else {
            train.push(id)
        }
    })?;
    val.flush()?;
    train.flush()?;
    bar.finish_and_clear();
    let mut shards = val.written;
    shards.extend(train.written);
    Ok(Prepared {
        train_tokens: train.total,
        val_tokens: val.total,
        shards,
    })
}

/// The inputs as (validation files, training files): a folder holding `train/` and `val/`
/// gives its `val/` files to the first list and its `train/` files to the second; every other
/// input goes to the second.
fn split_inputs(inputs: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut val, mut train) = (Vec::new(), Vec::new());
    for input in inputs {
        let (t, v) = (input.join("train"), input.join("val"));
        if input.is_dir() && t.is_dir() && v.is_dir() {
            val.extend(input_files(&[v])?);
            train.extend(input_files(&[t])?);
        } else {
            train.extend(input_files(std::slice::from_ref(input))?);
        }
    }
    Ok((val, train))
}

/// `nsa-train prepare` as the command runs it: [`prepare`] and what it wrote.
pub fn prepare_command(a: &PrepareArgs) -> Result<()> {
    let done = prepare(a)?;
    println!(
        "wrote {} shard(s) under {}: {} train tokens, {} validation tokens; train with --set data.source=\"bin\" --set data.path={:?}{}",
        done.shards.len(),
        a.out.display(),
        done.train_tokens,
        done.val_tokens,
        a.out.display().to_string(),
        if done.val_tokens > 0 {
            " (training reads train/, validation val/)"
        } else {
            ""
        }
    );
    Ok(())
}

/// The tokens of an llm.c shard, read back through the `bin` source's header check.
#[cfg(test)]
pub(crate) fn read_shard(path: &std::path::Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    let name = path.display().to_string();
    let l =
        crate::data::files::shard_layout(&bytes, crate::data::ShardFormat::Llmc, &name).unwrap();
    bytes[l.offset..]
        .chunks_exact(l.width)
        .map(|b| match *b {
            [a, b] => u16::from_le_bytes([a, b]) as u32,
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            _ => unreachable!("width 2 or 4"),
        })
        .collect()
}
