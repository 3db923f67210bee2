//! Token data from files, memory-mapped (memory use does not grow with the corpus): raw text as
//! byte tokens, and pre-tokenized shards in llm.c's format (a 256 × int32 header: magic 20240520
//! with version 1 → uint16 tokens, or magic 20240801 with version 7 → uint32 tokens; header\[2\]
//! is the token count) or nanoGPT's headerless uint16 files (`format = "raw-u16"`).
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use nsa_sys::mmap::MappedFile;
use tch::Tensor;

use super::{Batch, Rng, ShardFormat, TokenSource};

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

/// Where the tokens of one file sit in its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes before the first token (llm.c's header).
    pub offset: usize,
    /// Bytes per token: 1 (text), 2 (uint16) or 4 (uint32), little-endian.
    pub width: usize,
    pub count: usize,
}

/// llm.c's shard header: 256 little-endian int32.
pub const HEADER_INTS: usize = 256;
pub const MAGIC_U16: i32 = 20240520;
pub const MAGIC_U32: i32 = 20240801;

/// Checks one shard's bytes and says where its tokens are.
pub fn shard_layout(bytes: &[u8], format: ShardFormat, name: &str) -> Result<Layout> {
    match format {
        ShardFormat::RawU16 => {
            ensure!(
                bytes.len().is_multiple_of(2),
                "{name}: odd number of bytes for uint16 tokens"
            );
            Ok(Layout {
                offset: 0,
                width: 2,
                count: bytes.len() / 2,
            })
        }
        ShardFormat::Llmc => {
            ensure!(
                bytes.len() >= HEADER_INTS * 4,
                "{name}: {} bytes is shorter than llm.c's 1024-byte header (use data.format = \"raw-u16\" for headerless nanoGPT files)",
                bytes.len()
            );
            let h = |i: usize| {
                i32::from_le_bytes([
                    bytes[4 * i],
                    bytes[4 * i + 1],
                    bytes[4 * i + 2],
                    bytes[4 * i + 3],
                ])
            };
            let (magic, version, count) = (h(0), h(1), h(2));
            let body = bytes.len() - HEADER_INTS * 4;
            let width = match (magic, version) {
                (MAGIC_U16, 1) => 2,
                (MAGIC_U32, 7) => 4,
                _ => bail!(
                    "{name}: header magic/version {magic}/{version} is not llm.c's ({MAGIC_U16}/1 for uint16, {MAGIC_U32}/7 for uint32)"
                ),
            };
            ensure!(count >= 0, "{name}: negative token count {count} in header");
            let count = count as usize;
            ensure!(
                body == count * width,
                "{name}: header says {count} tokens ({} bytes) but the file holds {body} bytes after the header",
                count * width
            );
            Ok(Layout {
                offset: HEADER_INTS * 4,
                width,
                count,
            })
        }
    }
}

/// The tokens of several mapped files, read as one sequence.
#[derive(Debug)]
struct TokenStore {
    files: Vec<(MappedFile, Layout)>,
    /// `starts[i]`: index of file i's first token in the whole sequence (plus the total).
    starts: Vec<usize>,
}

impl TokenStore {
    fn open(files: &[PathBuf], layout: impl Fn(&[u8], &str) -> Result<Layout>) -> Result<Self> {
        let mut mapped = Vec::with_capacity(files.len());
        let mut starts = vec![0usize];
        for f in files {
            let map = MappedFile::open(f).with_context(|| format!("reading {}", f.display()))?;
            let l = layout(map.bytes(), &f.display().to_string())?;
            starts.push(starts[starts.len() - 1] + l.count);
            mapped.push((map, l));
        }
        Ok(TokenStore {
            files: mapped,
            starts,
        })
    }

    fn len(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    /// Token `i` of the whole sequence (`i < len()`).
    fn get(&self, i: usize) -> i64 {
        let f = self.starts.partition_point(|&s| s <= i) - 1;
        let (map, l) = &self.files[f];
        let at = l.offset + (i - self.starts[f]) * l.width;
        let b = &map.bytes()[at..at + l.width];
        match l.width {
            1 => b[0] as i64,
            2 => u16::from_le_bytes([b[0], b[1]]) as i64,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
        }
    }

    /// Largest token (one pass over the mapped files; 0 when empty).
    fn max_token(&self) -> i64 {
        (0..self.len()).map(|i| self.get(i)).max().unwrap_or(0)
    }

    /// Random windows, scored everywhere (plain language modelling); a function of
    /// `rng_parts` and the batch row.
    fn windows(&self, rng_parts: &[u64], batch: usize, s: usize) -> Result<Batch> {
        ensure!(
            self.len() > s + 1,
            "the data holds {} tokens, fewer than seq_len + 1 = {}",
            self.len(),
            s + 1
        );
        let n = batch
            .checked_mul(s)
            .with_context(|| format!("data.batch_size {batch} × data.seq_len {s} overflows"))?;
        let mut input = Vec::with_capacity(n);
        let mut target = Vec::with_capacity(n);
        for b in 0..batch {
            let mut parts = rng_parts.to_vec();
            parts.push(b as u64);
            let mut rng = Rng::new(&parts);
            let at = rng.below((self.len() - s - 1) as u64) as usize;
            input.extend((at..at + s).map(|i| self.get(i)));
            target.extend((at + 1..at + s + 1).map(|i| self.get(i)));
        }
        let shape = [batch as i64, s as i64];
        Ok(Batch {
            input: Tensor::f_from_slice(&input)?.f_view(shape)?,
            target: Tensor::f_from_slice(&target)?.f_view(shape)?,
        })
    }
}

/// Raw text files: byte-level tokens (vocab 256).
#[derive(Debug)]
pub(super) struct TextBytes {
    store: TokenStore,
    seed: u64,
    what: String,
}

impl TextBytes {
    pub(super) fn open(path: &Path, seed: u64) -> Result<Self> {
        let files = list_files(path)?;
        let store = TokenStore::open(&files, |bytes, _| {
            Ok(Layout {
                offset: 0,
                width: 1,
                count: bytes.len(),
            })
        })?;
        Ok(TextBytes {
            what: format!(
                "text bytes in {}: {} files, {} tokens",
                path.display(),
                files.len(),
                store.len()
            ),
            store,
            seed,
        })
    }
}

impl TokenSource for TextBytes {
    fn batch(&self, step: u64, rank: u64, batch: usize, s: usize) -> Result<Batch> {
        self.store.windows(&[self.seed, step, rank], batch, s)
    }
    fn vocab_needed(&self) -> i64 {
        256
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Pre-tokenized shards (llm.c's or nanoGPT's format).
#[derive(Debug)]
pub(super) struct BinShards {
    store: TokenStore,
    max_token: i64,
    seed: u64,
    what: String,
}

impl BinShards {
    pub(super) fn open(path: &Path, format: ShardFormat, seed: u64) -> Result<Self> {
        let files = list_files(path)?;
        let store = TokenStore::open(&files, |bytes, name| shard_layout(bytes, format, name))?;
        Ok(BinShards {
            what: format!(
                "token shards ({format}) in {}: {} files, {} tokens",
                path.display(),
                files.len(),
                store.len()
            ),
            max_token: store.max_token(),
            store,
            seed,
        })
    }
}

impl TokenSource for BinShards {
    fn batch(&self, step: u64, rank: u64, batch: usize, s: usize) -> Result<Batch> {
        self.store.windows(&[self.seed, step, rank], batch, s)
    }
    fn vocab_needed(&self) -> i64 {
        self.max_token + 1
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llmc(magic: i32, version: i32, count: i32, body: &[u8]) -> Vec<u8> {
        let mut h = vec![0i32; HEADER_INTS];
        h[0] = magic;
        h[1] = version;
        h[2] = count;
        let mut out: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.extend_from_slice(body);
        out
    }

    /// The tokens of one shard, through the same store the trainer reads.
    fn tokens(bytes: &[u8], format: ShardFormat) -> Result<Vec<i64>> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("s.bin");
        std::fs::write(&f, bytes)?;
        let store = TokenStore::open(&[f], |b, n| shard_layout(b, format, n))?;
        Ok((0..store.len()).map(|i| store.get(i)).collect())
    }

    #[test]
    fn llmc_shards_are_checked() {
        let body: Vec<u8> = [1u16, 2, 65535]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            tokens(&llmc(MAGIC_U16, 1, 3, &body), ShardFormat::Llmc).unwrap(),
            vec![1, 2, 65535]
        );
        let e = tokens(&llmc(MAGIC_U16, 1, 4, &body), ShardFormat::Llmc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("header says 4 tokens"), "{e}");
        let e = tokens(&llmc(123, 1, 3, &body), ShardFormat::Llmc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not llm.c's"), "{e}");
        let body32: Vec<u8> = [70000u32, 5].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            tokens(&llmc(MAGIC_U32, 7, 2, &body32), ShardFormat::Llmc).unwrap(),
            vec![70000, 5]
        );
        assert_eq!(
            tokens(&body, ShardFormat::RawU16).unwrap(),
            vec![1, 2, 65535]
        );
        assert!(tokens(&body[..3], ShardFormat::RawU16).is_err());
        assert!(tokens(&body, ShardFormat::Llmc)
            .unwrap_err()
            .to_string()
            .contains("header"));
    }

    #[test]
    fn several_shards_read_as_one_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (i, toks) in [vec![1u16, 2, 3], vec![], vec![4, 5]].iter().enumerate() {
            let body: Vec<u8> = toks.iter().flat_map(|v| v.to_le_bytes()).collect();
            let f = dir.path().join(format!("{i}.bin"));
            std::fs::write(&f, llmc(MAGIC_U16, 1, toks.len() as i32, &body)).unwrap();
            files.push(f);
        }
        let store = TokenStore::open(&files, |b, n| shard_layout(b, ShardFormat::Llmc, n)).unwrap();
        assert_eq!(
            (0..store.len()).map(|i| store.get(i)).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(store.max_token(), 5);
    }
}
