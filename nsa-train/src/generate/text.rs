//! Text ↔ token ids for a run: the one place generation learns how a run's data was tokenized.
//!
//! A run that recorded a tokenizer (`data.tokenizer`, copied into the run folder as
//! `tokenizer.json`) encodes and decodes with it ([`Bpe`]). Byte-level runs (`data.source =
//! "text"`) read raw bytes as ids 0–255 ([`Bytes`]). Runs on synthetic tasks, or on token shards
//! without a recorded tokenizer, have no text form: their prompts are given as ids and their
//! output printed as ids ([`IdsOnly`]).
use std::path::Path;

use anyhow::{anyhow, bail, Result};

use crate::data::{DataConfig, DataSource};
use crate::tokenize::run::{check_vocab, FILE_NAME};

/// How a run's text maps to token ids and back.
pub trait Tokenizer {
    /// Short description for the log line.
    fn describe(&self) -> String;
    /// The ids of `text`; an error when the run has no text form.
    fn encode(&self, text: &str) -> Result<Vec<i64>>;
    /// A decoder that turns ids into text as soon as it is complete (streaming).
    fn decoder(&self) -> Box<dyn TextDecoder>;
}

/// Streaming ids → text.
pub trait TextDecoder {
    /// Text completed by `id` (possibly empty: a UTF-8 character may need more bytes).
    fn push(&mut self, id: i64) -> String;
    /// Whatever is still pending at the end (an incomplete character as U+FFFD).
    fn finish(&mut self) -> String;
}

/// The tokenizer of the run in `run_dir`: its recorded `tokenizer.json` (whose vocabulary must
/// fit `model_vocab`), else bytes for a `text` run, else ids only.
pub fn for_run(run_dir: &Path, data: &DataConfig, model_vocab: i64) -> Result<Box<dyn Tokenizer>> {
    let recorded = run_dir.join(FILE_NAME);
    if recorded.is_file() {
        let tokenizer = crate::tokenize::load(&recorded)?;
        check_vocab(&recorded, tokenizer.get_vocab_size(true), model_vocab)?;
        return Ok(Box::new(Bpe {
            tokenizer: std::sync::Arc::new(tokenizer),
            path: recorded.display().to_string(),
        }));
    }
    Ok(match data.source {
        DataSource::Text => Box::new(Bytes),
        other => Box::new(IdsOnly {
            source: other.to_string(),
        }),
    })
}

/// A `tokenizer.json` (byte-level BPE: ours, GPT-2's).
pub struct Bpe {
    tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
    path: String,
}

impl Tokenizer for Bpe {
    fn describe(&self) -> String {
        format!(
            "{} ({} tokens)",
            self.path,
            self.tokenizer.get_vocab_size(true)
        )
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("encoding the prompt with {}: {e}", self.path))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    fn decoder(&self) -> Box<dyn TextDecoder> {
        Box::new(BpeStream {
            tokenizer: self.tokenizer.clone(),
            pending: Vec::new(),
        })
    }
}

/// Ids in, text out once it is whole: a byte-level token may end inside a UTF-8 character, so
/// ids wait until their decoded text no longer ends in U+FFFD (an incomplete character), or
/// until four tokens have waited (the text really holds one).
struct BpeStream {
    tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
    pending: Vec<u32>,
}

impl BpeStream {
    fn decode(&self) -> String {
        self.tokenizer
            .decode(&self.pending, false)
            .unwrap_or_else(|_| char::REPLACEMENT_CHARACTER.to_string())
    }
}

impl TextDecoder for BpeStream {
    fn push(&mut self, id: i64) -> String {
        let Ok(id) = u32::try_from(id) else {
            let mut out = self.finish();
            out.push(char::REPLACEMENT_CHARACTER);
            return out;
        };
        self.pending.push(id);
        let text = self.decode();
        if text.ends_with(char::REPLACEMENT_CHARACTER) && self.pending.len() < 4 {
            return String::new();
        }
        self.pending.clear();
        text
    }

    fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        let text = self.decode();
        self.pending.clear();
        text
    }
}

/// Byte-level text: each UTF-8 byte is one id.
#[derive(Debug)]
pub struct Bytes;

impl Tokenizer for Bytes {
    fn describe(&self) -> String {
        "bytes (UTF-8, ids 0-255)".into()
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        Ok(text.bytes().map(i64::from).collect())
    }

    fn decoder(&self) -> Box<dyn TextDecoder> {
        Box::new(Utf8Stream::default())
    }
}

/// Bytes in, complete UTF-8 characters out; an id that is not a byte (≥ 256), or an invalid
/// sequence, becomes U+FFFD.
#[derive(Debug, Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl TextDecoder for Utf8Stream {
    fn push(&mut self, id: i64) -> String {
        let Ok(byte) = u8::try_from(id) else {
            let mut out = self.finish();
            out.push(char::REPLACEMENT_CHARACTER);
            return out;
        };
        self.pending.push(byte);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            // Incomplete at the end: wait for more bytes.
            Err(e) if e.error_len().is_none() => String::new(),
            Err(_) => {
                let out = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                out
            }
        }
    }

    fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// A run whose tokens have no text form nsa-train knows (synthetic tasks, token shards).
#[derive(Debug)]
pub struct IdsOnly {
    source: String,
}

impl Tokenizer for IdsOnly {
    fn describe(&self) -> String {
        format!(
            "token ids (data.source = {:?} has no text form)",
            self.source
        )
    }

    fn encode(&self, _text: &str) -> Result<Vec<i64>> {
        bail!(
            "this run was trained on data.source = {:?}, whose tokens have no text form nsa-train \
             knows (only byte-level \"text\" runs do): give the prompt as ids with --prompt-ids",
            self.source
        )
    }

    fn decoder(&self) -> Box<dyn TextDecoder> {
        Box::new(IdList)
    }
}

/// Ids printed as numbers separated by spaces.
#[derive(Debug)]
struct IdList;

impl TextDecoder for IdList {
    fn push(&mut self, id: i64) -> String {
        format!(" {id}")
    }

    fn finish(&mut self) -> String {
        String::new()
    }
}

/// Parses `--prompt-ids`: ids separated by commas and/or whitespace.
pub fn parse_ids(list: &str) -> Result<Vec<i64>> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| anyhow::anyhow!("--prompt-ids: {s:?} is not an integer id"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_with_characters_split_across_tokens() {
        let text = "añ€😀 x";
        let ids = Bytes.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        let mut d = Bytes.decoder();
        let pieces: Vec<String> = ids.iter().map(|&i| d.push(i)).collect();
        assert_eq!(pieces.concat() + &d.finish(), text);
        // A character appears once all of its bytes have arrived, not before.
        assert_eq!(pieces[1], "");
        assert_eq!(pieces[2], "ñ");
    }

    #[test]
    fn invalid_bytes_and_non_byte_ids_become_replacement_characters() {
        let mut d = Bytes.decoder();
        assert_eq!(d.push(0xff), "\u{fffd}");
        assert_eq!(d.push(0xe2), "");
        assert_eq!(d.push(300), "\u{fffd}\u{fffd}");
        assert_eq!(d.push(b'a' as i64), "a");
        assert_eq!(d.push(0xe2), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn id_runs_take_ids_only() {
        let data = DataConfig::default();
        let dir = tempfile::tempdir().unwrap();
        let t = for_run(dir.path(), &data, 256).unwrap();
        let e = t.encode("hello").unwrap_err().to_string();
        assert!(e.contains("--prompt-ids") && e.contains("needle"), "{e}");
        let mut d = t.decoder();
        assert_eq!(d.push(7) + &d.push(12), " 7 12");
        assert_eq!(parse_ids("1, 2 3,,4").unwrap(), [1, 2, 3, 4]);
        assert!(parse_ids("1, x").unwrap_err().to_string().contains("\"x\""));
    }
}

#[cfg(test)]
mod bpe_tests {
    use super::*;
    use crate::tokenize::{train_tokenizer, TrainTokenizerArgs};

    /// A run folder holding a trained tokenizer: prompts encode with it, and the streaming
    /// decoder gives back exactly the text however the ids split its characters.
    #[test]
    fn a_recorded_tokenizer_encodes_and_streams_text_back() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        std::fs::create_dir_all(&corpus).unwrap();
        let sample = "Sparse attention reads few keys. Dense attention reads all of them.\n";
        std::fs::write(corpus.join("a.txt"), sample.repeat(50)).unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        train_tokenizer(&TrainTokenizerArgs {
            inputs: vec![corpus],
            vocab_size: 300,
            min_frequency: 2,
            out: run.join(FILE_NAME),
            progress: false,
        })
        .unwrap();
        let data = DataConfig {
            source: DataSource::Bin,
            ..DataConfig::default()
        };
        let t = for_run(&run, &data, 512).unwrap();
        assert!(t.describe().contains("tokenizer.json"), "{}", t.describe());
        let text = "Sparse keys: añ€😀 read again.";
        let ids = t.encode(text).unwrap();
        assert!(ids.len() < text.len(), "merges shorten the text: {ids:?}");
        let mut d = t.decoder();
        let streamed: String = ids.iter().map(|&i| d.push(i)).collect::<String>() + &d.finish();
        assert_eq!(streamed, text);
        // A vocabulary larger than the model's is an error naming both.
        let e = for_run(&run, &data, 100).err().unwrap().to_string();
        assert!(e.contains("model.vocab_size is 100"), "{e}");
    }
}
