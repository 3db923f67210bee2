//! Text ↔ token ids for a run: the one place generation learns how a run's data was tokenized.
//!
//! Byte-level runs (`data.source = "text"`) read raw bytes as ids 0–255 ([`Bytes`]). Runs on
//! synthetic tasks or on token shards have no text form that nsa-train knows: their prompts are
//! given as ids and their output printed as ids ([`IdsOnly`]). A run trained with a tokenizer
//! file will get a [`Tokenizer`] of its own here.
use anyhow::{bail, Result};

use crate::data::{DataConfig, DataSource};

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

/// The tokenizer of a run, from its data config.
pub fn for_run(data: &DataConfig) -> Box<dyn Tokenizer> {
    match data.source {
        DataSource::Text => Box::new(Bytes),
        other => Box::new(IdsOnly {
            source: other.to_string(),
        }),
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
        let t = for_run(&data);
        let e = t.encode("hello").unwrap_err().to_string();
        assert!(e.contains("--prompt-ids") && e.contains("needle"), "{e}");
        let mut d = t.decoder();
        assert_eq!(d.push(7) + &d.push(12), " 7 12");
        assert_eq!(parse_ids("1, 2 3,,4").unwrap(), [1, 2, 3, 4]);
        assert!(parse_ids("1, x").unwrap_err().to_string().contains("\"x\""));
    }
}
