//! Read-only memory maps of data files, so token shards of any size are read in place instead of
//! loaded whole. `memmap2::Mmap::map` is `unsafe` because the file could change underneath the
//! map; this module is where that is accepted.
use std::path::Path;

/// A file mapped read-only into memory (an empty file maps to an empty slice).
///
/// The file must not be truncated or rewritten while a run reads it (training data never is);
/// reading a page of a file truncated underneath the map raises SIGBUS.
#[derive(Debug)]
pub struct MappedFile {
    map: Option<memmap2::Mmap>,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        if file.metadata()?.len() == 0 {
            // mmap(2) rejects a zero-length mapping.
            return Ok(MappedFile { map: None });
        }
        // SAFETY: read-only map of a file the caller promises not to modify while mapped (see
        // the type's documentation); the slice handed out never outlives `self`.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(MappedFile { map: Some(map) })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_files_and_empty_files() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), b"hello").unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();
        assert_eq!(MappedFile::open(&dir.join("a")).unwrap().bytes(), b"hello");
        assert!(MappedFile::open(&dir.join("empty"))
            .unwrap()
            .bytes()
            .is_empty());
        assert!(MappedFile::open(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
