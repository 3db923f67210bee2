use super::prepare::{prepare, read_shard, PrepareArgs};
use super::*;

/// A small English fixture: sentences with varied words, spaces and blank lines.
fn fixture_text(seed: u64, lines: usize) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "attention",
        "sparse",
        "model",
        "learns",
        "to",
        "select",
        "blocks",
        "of",
        "keys",
        "while",
        "a",
        "window",
        "keeps",
        "local",
        "context",
        "and",
        "compressed",
        "tokens",
        "summarise",
        "far",
        "history",
        "quickly",
        "again",
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut s = String::new();
    for i in 0..lines {
        let words = 3 + next(10);
        let line: Vec<&str> = (0..words).map(|_| WORDS[next(WORDS.len())]).collect();
        s.push_str(&line.join(" "));
        s.push_str(match i % 7 {
            0 => ".\n\n",
            3 => ",  \n",
            5 => "\n  ",
            _ => ".\n",
        });
    }
    s
}

fn train_fixture(dir: &Path, vocab_size: usize) -> PathBuf {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(corpus.join("a.txt"), fixture_text(1, 400)).unwrap();
    std::fs::write(corpus.join("b.txt"), fixture_text(2, 300)).unwrap();
    let out = dir.join("tokenizer.json");
    train_tokenizer(&TrainTokenizerArgs {
        inputs: vec![corpus],
        vocab_size,
        min_frequency: 2,
        out: out.clone(),
        progress: false,
    })
    .unwrap();
    out
}

#[test]
fn trained_tokenizer_round_trips_any_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = train_fixture(dir.path(), 320);
    let tok = load(&path).unwrap();
    let vocab = tok.get_vocab_size(true);
    assert!(vocab > 257 && vocab <= 320, "vocabulary of {vocab}");
    assert!(tok.token_to_id(END_OF_TEXT).is_some());
    // Merges were learned: a frequent word is fewer tokens than bytes.
    let ids = tok.encode("the attention", false).unwrap();
    assert!(
        ids.get_ids().len() < "the attention".len(),
        "{:?}",
        ids.get_ids()
    );
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 64,
        ..Default::default()
    });
    runner
        .run(&"\\PC{0,40}", |text| {
            let enc = tok.encode(text.as_str(), false).unwrap();
            let back = tok.decode(enc.get_ids(), false).unwrap();
            proptest::prop_assert_eq!(back, text);
            Ok(())
        })
        .unwrap();
}

#[test]
fn bad_vocab_size_is_refused_before_reading() {
    let e = train_tokenizer(&TrainTokenizerArgs {
        inputs: vec!["/nonexistent".into()],
        vocab_size: 256,
        min_frequency: 2,
        out: "/nonexistent/tokenizer.json".into(),
        progress: false,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--vocab-size 256"), "{e}");
}

/// The shards hold exactly the tokens of each whole file encoded at once (the naive
/// reference), each file after the end-of-text token, the first `val_tokens` in `val/`,
/// whatever the chunk size, batch size and shard size.
#[test]
fn prepare_matches_whole_file_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = train_fixture(dir.path(), 400);
    let tok = load(&tok_path).unwrap();
    let eot = tok.token_to_id(END_OF_TEXT).unwrap();
    let texts = dir.path().join("texts");
    std::fs::create_dir_all(&texts).unwrap();
    let mut want = Vec::new();
    for (i, seed) in [11u64, 12, 13].iter().enumerate() {
        let text = fixture_text(*seed, 60 + 25 * i);
        std::fs::write(texts.join(format!("{i}.txt")), &text).unwrap();
        want.push(eot);
        want.extend(tok.encode(text.as_str(), false).unwrap().get_ids());
    }
    for (run, (chunk_bytes, batch_chunks, shard_tokens, val_tokens)) in [
        (1 << 20, 64, 1_000_000, 0),
        (40, 3, 97, 150),
        (1, 1, 1000, 7),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("shards-{run}"));
        let done = prepare(&PrepareArgs {
            inputs: vec![texts.clone()],
            tokenizer: tok_path.clone(),
            out: out.clone(),
            shard_tokens,
            val_tokens,
            batch_chunks,
            chunk_bytes,
            progress: false,
        })
        .unwrap();
        let total = want.len() as u64;
        assert_eq!(done.val_tokens, val_tokens.min(total));
        assert_eq!(done.train_tokens + done.val_tokens, total);
        let mut got = Vec::new();
        for shard in &done.shards {
            let toks = read_shard(shard);
            assert!(toks.len() as u64 <= shard_tokens);
            got.extend(toks);
        }
        assert_eq!(got, want, "run {run}");
        let val: Vec<u32> = done
            .shards
            .iter()
            .filter(|p| p.starts_with(out.join("val")))
            .flat_map(|p| read_shard(p))
            .collect();
        assert_eq!(val, want[..val_tokens.min(total) as usize], "run {run}");
        // Only whole shards, no temporaries.
        for split in ["train", "val"] {
            for e in std::fs::read_dir(out.join(split)).into_iter().flatten() {
                let name = e.unwrap().file_name().into_string().unwrap();
                assert!(
                    name.ends_with(".bin") && name.starts_with("shard_"),
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn prepare_refuses_bad_input_and_keeps_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = train_fixture(dir.path(), 300);
    let out = dir.path().join("full");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.bin"), b"old").unwrap();
    let args = |out: PathBuf, shard_tokens: u64, tokenizer: PathBuf| PrepareArgs {
        inputs: vec![dir.path().join("corpus")],
        tokenizer,
        out,
        shard_tokens,
        val_tokens: 0,
        batch_chunks: 4,
        chunk_bytes: 1 << 20,
        progress: false,
    };
    let e = prepare(&args(out.clone(), 100, tok_path.clone())).unwrap_err();
    assert!(e.to_string().contains("is not empty"), "{e}");
    assert_eq!(std::fs::read(out.join("keep.bin")).unwrap(), b"old");
    let e = prepare(&args(dir.path().join("new"), 0, tok_path.clone())).unwrap_err();
    assert!(e.to_string().contains("--shard-tokens"), "{e}");
    let e = prepare(&args(
        dir.path().join("new"),
        100,
        dir.path().join("none.json"),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("loading tokenizer"), "{e}");
    assert!(!dir.path().join("new").exists());
}

#[test]
fn chunks_cut_only_where_the_pre_tokenizer_splits() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.txt");
    std::fs::write(&f, "ab\ncd  \nef\n\ngh\n ij\nkl").unwrap();
    let mut chunks = Chunks::new(vec![f], 1, indicatif::ProgressBar::hidden());
    let mut got = Vec::new();
    while let Some(c) = chunks.next_chunk().unwrap() {
        got.push((c.starts_document, c.text));
    }
    let want = [
        (true, "ab\n"),
        (false, "cd  \nef\n\ngh\n ij\n"),
        (false, "kl"),
    ];
    let want: Vec<(bool, String)> = want.iter().map(|(s, t)| (*s, t.to_string())).collect();
    assert_eq!(got, want);
}

/// An input folder with `train/` and `val/` (the corpus layout) keeps its split: val/ shards
/// hold exactly the tokens of its val/ files, train/ those of its train/ files; mixing that with
/// --val-tokens is refused.
#[test]
fn prepare_keeps_a_corpus_split() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = train_fixture(dir.path(), 300);
    let corpus = dir.path().join("split");
    for (split, seed) in [("train", 5), ("val", 6)] {
        std::fs::create_dir_all(corpus.join(split)).unwrap();
        std::fs::write(corpus.join(split).join("d.txt"), fixture_text(seed, 50)).unwrap();
    }
    let tok = load(&tok_path).unwrap();
    let eot = tok.token_to_id(END_OF_TEXT).unwrap();
    let encode = |seed| -> Vec<u32> {
        let mut ids = vec![eot];
        ids.extend(tok.encode(fixture_text(seed, 50), false).unwrap().get_ids());
        ids
    };
    let args = |out: PathBuf, val_tokens| PrepareArgs {
        inputs: vec![corpus.clone()],
        tokenizer: tok_path.clone(),
        out,
        shard_tokens: 1 << 20,
        val_tokens,
        batch_chunks: 4,
        chunk_bytes: 1 << 20,
        progress: false,
    };
    let out = dir.path().join("shards");
    let done = prepare(&args(out.clone(), 0)).unwrap();
    assert_eq!(read_shard(&out.join("val/shard_000000.bin")), encode(6));
    assert_eq!(read_shard(&out.join("train/shard_000000.bin")), encode(5));
    assert_eq!(done.val_tokens, encode(6).len() as u64);
    let e = prepare(&args(dir.path().join("other"), 10)).unwrap_err();
    assert!(e.to_string().contains("own train/ and val/"), "{e}");
}
