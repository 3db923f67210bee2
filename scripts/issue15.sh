#!/usr/bin/env bash
# Issue 15's GPU experiments, end to end, with only the nsa-train binary, a prepared shard folder
# and its tokenizer.json (no cargo):
#   1. real text: `small` at S = 2048 and 8192, NSA and dense (configs/text-small-s*.toml);
#   2. retrieval: recall at a distance, S = 4096 and 16384, NSA and dense
#      (configs/recall-small-s*.toml), each evaluated by generation at 1x, 2x and 4x its length;
#   3. `nsa-train compare` for each: PNGs and Markdown tables under OUT/text and OUT/recall.
#
# Usage: scripts/issue15.sh SHARDS TOKENIZER OUT [text|recall|all]
#   SHARDS     folder with train/ and val/ llm.c shards (nsa-train prepare's output)
#   TOKENIZER  the tokenizer.json the shards were made with
#   OUT        results folder (runs/, logs/, evals/, text/, recall/)
# NSA_TRAIN names the binary (default: target/release/nsa-train if built, else nsa-train on PATH).
# Every run is one process; a failed one stops the script (set -e) with its log in OUT/logs/.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,14p' "$0"
    exit 2
fi
SHARDS=$1
TOKENIZER=$2
OUT=$3
WHAT=${4:-all}
HERE=$(cd "$(dirname "$0")/.." && pwd)
CONFIGS=$HERE/configs
if [[ -n "${NSA_TRAIN:-}" ]]; then
    BIN=$NSA_TRAIN
elif [[ -x "$HERE/target/release/nsa-train" ]]; then
    BIN=$HERE/target/release/nsa-train
else
    BIN=nsa-train
fi
[[ -d "$SHARDS/train" && -d "$SHARDS/val" ]] || { echo "$SHARDS has no train/ and val/" >&2; exit 2; }
[[ -f "$TOKENIZER" ]] || { echo "no tokenizer at $TOKENIZER" >&2; exit 2; }
mkdir -p "$OUT/runs" "$OUT/logs" "$OUT/evals"
RUNS=$OUT/runs

train() { # NAME CONFIG [--set ...]
    local name=$1 config=$2
    shift 2
    echo "== train $name ($(date +%T))"
    "$BIN" train --config "$config" --name "$name" --overwrite \
        --set "run.out_dir=\"$RUNS\"" "$@" >"$OUT/logs/$name.log" 2>&1 \
        || { tail -30 "$OUT/logs/$name.log"; exit 1; }
    tail -3 "$OUT/logs/$name.log"
}

if [[ $WHAT == all || $WHAT == text ]]; then
    text_runs=()
    for s in 2048 8192; do
        for att in nsa dense; do
            train "text-$att-s$s" "$CONFIGS/text-small-s$s.toml" \
                --set "model.attention=\"$att\"" \
                --set "data.path=\"$SHARDS\"" --set "data.tokenizer=\"$TOKENIZER\""
            text_runs+=("$RUNS/text-$att-s$s")
        done
    done
    "$BIN" compare "${text_runs[@]}" --out "$OUT/text" \
        --title "small on real text: NSA vs dense at S = 2048 and 8192"
    for att in nsa dense; do
        "$BIN" generate "$RUNS/text-$att-s2048" --prompt "The kernel" --max-new-tokens 120 \
            --greedy >"$OUT/text/sample-$att.txt" 2>"$OUT/logs/sample-$att.log" || true
    done
fi

if [[ $WHAT == all || $WHAT == recall ]]; then
    recall_runs=()
    evals=()
    for s in 4096 16384; do
        # About 1000 scored answers per evaluation (64 per sequence at 4096, 128 at 16384):
        # NSA's decode step is ~12 ms for `small`, so more sequences cost minutes.
        samples=$((s == 4096 ? 16 : 8))
        for att in nsa dense; do
            name="recall-$att-s$s"
            train "$name" "$CONFIGS/recall-small-s$s.toml" --set "model.attention=\"$att\""
            recall_runs+=("$RUNS/$name")
            for x in 1 2 4; do
                len=$((s * x))
                echo "== eval $name at $len"
                "$BIN" eval "$RUNS/$name" --task recall --len "$len" --samples "$samples" --buckets 8 \
                    --json "$OUT/evals/$name-len$len.json" >"$OUT/logs/eval-$name-len$len.log" 2>&1 \
                    || { tail -20 "$OUT/logs/eval-$name-len$len.log"; exit 1; }
                grep -E "accuracy [0-9.]+ over" "$OUT/logs/eval-$name-len$len.log" | sed 's/^.*: step/  step/'
                evals+=(--eval "$OUT/evals/$name-len$len.json")
            done
        done
    done
    "$BIN" compare "${recall_runs[@]}" "${evals[@]}" --out "$OUT/recall" \
        --title "recall at a distance: NSA vs dense at S = 4096 and 16384"
fi
echo "results: $OUT/text/compare.md $OUT/recall/compare.md"
