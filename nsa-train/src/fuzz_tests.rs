//! Fuzz-style robustness of the parsers a user feeds: a few hundred mutated config files,
//! `--set` overrides and token shards go through config resolution, model-config building, the
//! size check and the data readers. Each must give a value or a typed error, never a panic.
use proptest::prelude::*;

use crate::config;
use crate::data;

const EXAMPLE: &str = include_str!("../../configs/example.toml");

/// Values that have broken parsers before: huge, negative, non-finite, wrong types, odd text.
const VALUES: [&str; 25] = [
    "0",
    "-1",
    "1",
    "2",
    "1e12",
    "1000000000000",
    "4611686018427387904",
    "18446744073709551615",
    "99999999999999999999",
    "nan",
    "inf",
    "-inf",
    "1e30",
    "0.5",
    "true",
    "\"\"",
    "\"..\"",
    "\"/tmp\"",
    "\"abc",
    "[1, 2]",
    "{ a = 1 }",
    "\"dense\"",
    "\"bin\"",
    "\"raw-u16\"",
    "\"cuda:9\"",
];

const KEYS: [&str; 28] = [
    "run.name",
    "run.steps",
    "run.seed",
    "run.device",
    "run.precision",
    "run.log_every",
    "run.eval_batches",
    "run.keep_checkpoints",
    "run.profile",
    "model.preset",
    "model.vocab_size",
    "model.dim",
    "model.n_heads",
    "model.nsa.window",
    "model.nsa.stride",
    "data.source",
    "data.format",
    "data.seq_len",
    "data.batch_size",
    "data.recall_pairs",
    "data.recall_distance",
    "data.recall_curriculum_steps",
    "optim.lr",
    "optim.eps",
    "optim.grad_accum",
    "fast.ddp_bucket_mb",
    "fast.key_outer_chunk_mib",
    "fast.attn_path",
];

/// Everything downstream of a resolved config that runs without a device or data files.
fn exercise(cfg: &config::TrainConfig) {
    if let Ok(model) = crate::train::model_config(cfg) {
        let _ = crate::sizes::check(cfg, &model, Some(24e9));
        let _ = format!("{model}");
    }
    let _ = cfg.to_toml();
}

fn mutate_config(lines: &[&str], edits: &[(usize, usize, usize)]) -> String {
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    for &(at, what, val) in edits {
        let i = at % out.len().max(1);
        match what % 4 {
            // Replace the value of a `key = value` line.
            0 => {
                if let Some((k, _)) = out[i].clone().split_once('=') {
                    out[i] = format!("{k}= {}", VALUES[val % VALUES.len()]);
                }
            }
            1 => {
                out.remove(i);
                if out.is_empty() {
                    out.push(String::new());
                }
            }
            2 => out.insert(i, out[i].clone()),
            _ => out.insert(
                i,
                format!(
                    "{} = {}",
                    KEYS[val % KEYS.len()].rsplit('.').next().unwrap_or("x"),
                    VALUES[val % VALUES.len()]
                ),
            ),
        }
    }
    out.join("\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_config_files_never_panic(edits in prop::collection::vec((0usize..200, 0usize..4, 0usize..64), 1..6)) {
        let lines: Vec<&str> = EXAMPLE.lines().collect();
        let text = mutate_config(&lines, &edits);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        if let Ok(cfg) = config::resolve(Some(&path), &[], std::iter::empty()) {
            exercise(&cfg);
        }
    }

    #[test]
    fn mutated_overrides_never_panic(sets in prop::collection::vec((0usize..KEYS.len(), 0usize..VALUES.len()), 1..5)) {
        let sets: Vec<String> = sets.iter().map(|&(k, v)| format!("{}={}", KEYS[k], VALUES[v])).collect();
        if let Ok(cfg) = config::resolve(None, &sets, std::iter::empty()) {
            exercise(&cfg);
        }
    }

    #[test]
    fn mutated_shards_never_panic(
        count in 0i32..64,
        magic in prop::sample::select(vec![20240520i32, 20240801, 0, -1]),
        version in prop::sample::select(vec![1i32, 7, 0, -5]),
        body in prop::collection::vec(any::<u8>(), 0..300),
        cut in 0usize..1400,
        raw in any::<bool>(),
        seq in 1usize..40,
        batch in 1usize..4,
    ) {
        let mut bytes = vec![0u8; 1024];
        bytes[0..4].copy_from_slice(&magic.to_le_bytes());
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        bytes[8..12].copy_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&body);
        bytes.truncate(cut.max(1));
        let format = if raw { data::ShardFormat::RawU16 } else { data::ShardFormat::Llmc };
        let _ = data::shard_layout(&bytes, format, "fuzz");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shard.bin"), &bytes).unwrap();
        let cfg = data::DataConfig {
            source: data::DataSource::Bin,
            path: Some(dir.path().to_path_buf()),
            format,
            seq_len: seq,
            batch_size: batch,
            ..Default::default()
        };
        if let Ok(src) = data::open(&cfg, 65536, 0, data::Split::Train) {
            let _ = src.batch(0, 0, batch, seq);
        }
    }
}
