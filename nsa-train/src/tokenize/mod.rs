//! Real text for training: `nsa-train tokenizer train` (a byte-level BPE trained with the
//! `tokenizers` crate, written as `tokenizer.json`) and `nsa-train prepare` ([`prepare`]: text
//! files → llm.c token shards that the `bin` data source reads memory-mapped).
//!
//! Text is read as a stream of chunks cut at line ends ([`Chunks`]), so memory does not grow
//! with the corpus; invalid UTF-8 is replaced by U+FFFD.
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

pub mod prepare;
pub mod run;

/// The end-of-text token: added to every tokenizer we train, and put before each document
/// (input file) by [`prepare`] when the tokenizer knows it (GPT-2's does).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Arguments of `nsa-train tokenizer train`.
#[derive(Debug, clap::Args)]
pub struct TrainTokenizerArgs {
    /// Text files, or folders whose files are all text (read in sorted order).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Vocabulary size: the 256 byte tokens, the end-of-text token and the merges learned.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Merges are kept only for pairs seen at least this often.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Where to write the tokenizer.
    #[arg(long, default_value = "tokenizer.json")]
    pub out: PathBuf,
    /// Draw a progress bar (off when stdout is not a terminal).
    #[arg(skip)]
    pub progress: bool,
}

/// The regular files of each input (a file, or a folder's files), sorted within each folder.
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta =
            std::fs::metadata(input).with_context(|| format!("input {}", input.display()))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("reading folder {}", input.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            found.retain(|p| p.is_file());
            found.sort();
            ensure!(
                !found.is_empty(),
                "input folder {} holds no files",
                input.display()
            );
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

/// A progress bar over `total` bytes of input (hidden when `show` is false).
pub(crate) fn bytes_bar(total: u64, show: bool, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:40}}] {{bytes}}/{{total_bytes}} ({{bytes_per_sec}}, eta {{eta}}) {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Trains a byte-level BPE on the inputs and writes it as `tokenizer.json` (through a temporary
/// file: an existing file is replaced only by a whole new one).
///
/// Byte-level: every byte is a token before any merge, so any text encodes and decodes back
/// unchanged. No prefix space is added, so text encoded in chunks cut at line ends gives the
/// tokens of the whole (see [`Chunks`]).
pub fn train_tokenizer(a: &TrainTokenizerArgs) -> Result<()> {
    let bytes_alphabet = 256;
    ensure!(
        a.vocab_size > bytes_alphabet,
        "--vocab-size {} leaves no room for merges: it must exceed the {bytes_alphabet} byte tokens and the end-of-text token",
        a.vocab_size
    );
    let files = input_files(&a.inputs)?;
    let total = total_bytes(&files)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(a.vocab_size)
        .min_frequency(a.min_frequency)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level().into()))
    .with_post_processor(Some(byte_level().into()))
    .with_decoder(Some(byte_level().into()))
    .build()
    .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    let bar = bytes_bar(total, a.progress, "counting pairs");
    let mut chunks = Chunks::new(files, 1 << 20, bar.clone());
    tokenizer
        .train(&mut trainer, chunks.by_ref())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    if let Some(e) = chunks.error.take() {
        return Err(e);
    }
    bar.finish_and_clear();
    let json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    crate::write_atomic(&a.out, json.as_bytes())?;
    println!(
        "wrote {} ({} tokens, from {} bytes of text)",
        a.out.display(),
        tokenizer.get_vocab_size(true),
        total
    );
    Ok(())
}

/// GPT-2's byte-level pre-tokenizer, post-processor and decoder, without the prefix space.
fn byte_level() -> ByteLevel {
    ByteLevel::new(false, true, true)
}

fn total_bytes(files: &[PathBuf]) -> Result<u64> {
    files.iter().try_fold(0u64, |sum, f| {
        let len = std::fs::metadata(f)
            .with_context(|| format!("input {}", f.display()))?
            .len();
        Ok(sum + len)
    })
}

/// One piece of a document (an input file) as [`Chunks`] yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The first chunk of its file (a document starts here).
    pub starts_document: bool,
    pub text: String,
}

/// The input files as a stream of text chunks of about `target` bytes, each cut after a line
/// end only where the byte-level pre-tokenizer splits anyway: the line ends in a non-space
/// character and `\n`, and the next line starts with a non-space character. There the regex
/// always makes `\n` a piece of its own (a run of spaces takes the `\n` only when no
/// non-space follows), so the tokens of the chunks are the tokens of the whole file. A file
/// with no such place stays one chunk. A read error stops the stream and is kept in `error`.
pub struct Chunks {
    files: std::vec::IntoIter<PathBuf>,
    reader: Option<std::io::BufReader<std::fs::File>>,
    target: usize,
    bar: ProgressBar,
    /// The text gathered for the next chunk, and whether it starts a document.
    pending: String,
    pending_starts: bool,
    pub error: Option<anyhow::Error>,
}

impl Chunks {
    pub fn new(files: Vec<PathBuf>, target: usize, bar: ProgressBar) -> Self {
        Chunks {
            files: files.into_iter(),
            reader: None,
            target: target.max(1),
            bar,
            pending: String::new(),
            pending_starts: false,
            error: None,
        }
    }

    /// The next chunk, or `None` at the end of the input.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        let mut line = Vec::new();
        loop {
            let Some(reader) = self.reader.as_mut() else {
                match self.files.next() {
                    Some(path) => {
                        let f = std::fs::File::open(&path)
                            .with_context(|| format!("opening {}", path.display()))?;
                        self.reader = Some(std::io::BufReader::with_capacity(1 << 20, f));
                        if !self.pending.is_empty() {
                            let text = std::mem::take(&mut self.pending);
                            let starts = std::mem::replace(&mut self.pending_starts, true);
                            return Ok(Some(Chunk {
                                starts_document: starts,
                                text,
                            }));
                        }
                        self.pending_starts = true;
                        continue;
                    }
                    None if self.pending.is_empty() => return Ok(None),
                    None => {
                        return Ok(Some(Chunk {
                            starts_document: std::mem::take(&mut self.pending_starts),
                            text: std::mem::take(&mut self.pending),
                        }))
                    }
                }
            };
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                self.reader = None;
                continue;
            }
            self.bar.inc(n as u64);
            let text = String::from_utf8_lossy(&line);
            let cut_here = self.pending.len() >= self.target
                && ends_a_piece(&self.pending)
                && text.chars().next().is_some_and(|c| !c.is_whitespace());
            if cut_here {
                let chunk = Chunk {
                    starts_document: std::mem::take(&mut self.pending_starts),
                    text: std::mem::replace(&mut self.pending, text.into_owned()),
                };
                return Ok(Some(chunk));
            }
            self.pending.push_str(&text);
        }
    }
}

/// Whether `text` ends in a non-space character followed by `\n`.
fn ends_a_piece(text: &str) -> bool {
    let mut rev = text.chars().rev();
    rev.next() == Some('\n') && rev.next().is_some_and(|c| !c.is_whitespace())
}

/// The chunks' texts, for [`tokenizers::TokenizerImpl::train`] (which takes an iterator of
/// strings): an error ends the iteration and is kept in [`Chunks::error`].
impl Iterator for Chunks {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.error.is_some() {
            return None;
        }
        match self.next_chunk() {
            Ok(c) => c.map(|c| c.text),
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }
}

/// Loads a `tokenizer.json` (ours or any other, e.g. GPT-2's).
pub fn load(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
