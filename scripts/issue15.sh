#!/usr/bin/env bash
# Issue 15's GPU experiments, end to end, with only the nsa-train binary, a prepared shard folder
# and its tokenizer.json (no cargo):
#   1. real text: `small` at S = 2048 and 8192, NSA and dense (configs/text-small-s*.toml);
#   2. retrieval, NSA and dense side by side in two stages: the key-value binding at S = 128
#      (configs/recall-small-short.toml, once per OUT), then each model continued at a distance
#      at S = 1024, 4096 or 16384 (configs/recall-small-s*.toml), each evaluated by generation
#      at 1x, 2x and 4x its length (1x and 2x from 16384); or in three stages, S = 4096
#      continued from the S = 1024 stage instead of stage 1 (recall-4096-from-1024), then
#      S = 8192 from that model (recall-8192-from-4096, runs *-s8192-chain) and S = 16384 from
#      the S = 8192 model (recall-16384-from-8192, runs *-s16384-chain);
#   3. `nsa-train compare` for each: PNGs and Markdown tables under OUT/text and OUT/recall-s*
#      (OUT/recall-s4096-from-s1024, OUT/recall-s8192-chain, OUT/recall-s16384-chain for the
#      chained stages).
#
# Usage: scripts/issue15.sh SHARDS TOKENIZER OUT [WHAT [TRAIN_ARGS...]]
#   SHARDS     folder with train/ and val/ llm.c shards (nsa-train prepare's output)
#   TOKENIZER  the tokenizer.json the shards were made with
#   OUT        results folder (runs/, logs/, evals/, text/, recall-s*/)
#   WHAT       all (default) | text | recall | text-2048 | text-8192 | recall-1024 | recall-4096
#              | recall-16384 | recall-4096-from-1024 (needs recall-1024's runs in OUT)
#              | recall-8192-from-4096 (needs recall-4096-from-1024's runs in OUT)
#              | recall-16384-from-8192 (needs recall-8192-from-4096's runs in OUT)
#              or several of these, comma-separated, run in that order (e.g. the whole chain
#              recall-1024,recall-4096-from-1024,recall-8192-from-4096,recall-16384-from-8192)
#   TRAIN_ARGS passed to every `nsa-train train` (e.g. --set run.steps=300)
# NSA_TRAIN names the binary (default: target/release/nsa-train if built, else nsa-train on PATH);
# ATTENTIONS the recall parts' attentions (default "nsa dense"; e.g. "nsa" to spend a short
# device call on NSA alone).
# Every run is one process; a failed one stops the script (set -e) with its log in OUT/logs/.
# The recall parts need no SHARDS or TOKENIZER (pass anything, e.g. `none none`).
# What learns recall beyond NSA's window at S = 4096 (RESULTS.md, 2026-12-06): recall-1024, then
# recall-4096-from-1024, both with TRAIN_ARGS --set 'model.nsa.phi="mean"'; with the default MLP
# phi, or straight from stage 1, NSA stays near the no-binding level beyond its window. At
# S = 16384: recall-8192-from-4096, then recall-16384-from-8192 (same TRAIN_ARGS).
# Parts can run in separate calls with the same OUT (each part takes a few minutes on one H200);
# the text comparison then covers every finished text run in OUT. Checkpoints stay under
# OUT/runs/*/checkpoints (large); everything else in OUT is small.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,38p' "$0"
    exit 2
fi
SHARDS=$1
TOKENIZER=$2
OUT=$3
WHAT=${4:-all}
shift $(($# < 4 ? $# : 4))
EXTRA=("$@")
if [[ $WHAT == *,* ]]; then
    for part in ${WHAT//,/ }; do
        "$0" "$SHARDS" "$TOKENIZER" "$OUT" "$part" ${EXTRA[@]+"${EXTRA[@]}"} || exit
    done
    exit 0
fi
HERE=$(cd "$(dirname "$0")/.." && pwd)
CONFIGS=$HERE/configs
if [[ -n "${NSA_TRAIN:-}" ]]; then
    BIN=$NSA_TRAIN
elif [[ -x "$HERE/target/release/nsa-train" ]]; then
    BIN=$HERE/target/release/nsa-train
else
    BIN=nsa-train
fi
recall_atts=${ATTENTIONS:-nsa dense}
for att in $recall_atts; do
    [[ $att == nsa || $att == dense ]] || { echo "ATTENTIONS holds nsa and/or dense, not $att" >&2; exit 2; }
done
# recall_from: the stage the recall runs continue (short = stage 1; s1024 = the S = 1024 stage;
# s4096-from-s1024 = the S = 4096 stage that continued it; s8192-chain = the S = 8192 stage
# that continued that one). stage_suffix: the new runs' names (recall-ATT-SUFFIX; default sS,
# or sS-from-RECALL_FROM).
recall_from=short
stage_suffix=
case $WHAT in
    all) text_seqs="2048 8192" recall_seqs="4096 16384" ;;
    text) text_seqs="2048 8192" recall_seqs="" ;;
    recall) text_seqs="" recall_seqs="4096 16384" ;;
    text-2048 | text-8192) text_seqs=${WHAT#text-} recall_seqs="" ;;
    recall-1024 | recall-4096 | recall-16384) text_seqs="" recall_seqs=${WHAT#recall-} ;;
    recall-4096-from-1024) text_seqs="" recall_seqs=4096 recall_from=s1024 ;;
    recall-8192-from-4096) text_seqs="" recall_seqs=8192 recall_from=s4096-from-s1024 stage_suffix=s8192-chain ;;
    recall-16384-from-8192) text_seqs="" recall_seqs=16384 recall_from=s8192-chain stage_suffix=s16384-chain ;;
    *) echo "WHAT must be all, text, recall, text-2048, text-8192, recall-1024, recall-4096," \
        "recall-16384, recall-4096-from-1024, recall-8192-from-4096 or recall-16384-from-8192" >&2
        exit 2 ;;
esac
if [[ $recall_from != short ]]; then
    for att in $recall_atts; do
        [[ -f "$OUT/runs/recall-$att-$recall_from/summary.json" ]] \
            || { echo "no $OUT/runs/recall-$att-$recall_from: run the stage before first" >&2; exit 2; }
    done
fi
if [[ -n $text_seqs ]]; then
    [[ -d "$SHARDS/train" && -d "$SHARDS/val" ]] || { echo "$SHARDS has no train/ and val/" >&2; exit 2; }
    [[ -f "$TOKENIZER" ]] || { echo "no tokenizer at $TOKENIZER" >&2; exit 2; }
fi
mkdir -p "$OUT/runs" "$OUT/logs" "$OUT/evals"
RUNS=$OUT/runs

train() { # NAME CONFIG [--set ...]
    local name=$1 config=$2
    shift 2
    echo "== train $name ($(date +%T))"
    "$BIN" train --config "$config" --name "$name" --overwrite \
        --set "run.out_dir=\"$RUNS\"" "$@" ${EXTRA[@]+"${EXTRA[@]}"} >"$OUT/logs/$name.log" 2>&1 \
        || { tail -30 "$OUT/logs/$name.log"; exit 1; }
    tail -3 "$OUT/logs/$name.log"
}

if [[ -n $text_seqs ]]; then
    for s in $text_seqs; do
        for att in nsa dense; do
            train "text-$att-s$s" "$CONFIGS/text-small-s$s.toml" \
                --set "model.attention=\"$att\"" \
                --set "data.path=\"$SHARDS\"" --set "data.tokenizer=\"$TOKENIZER\""
        done
    done
    # Every finished text run in OUT (an earlier call's too: text-2048 then text-8192 end with
    # one comparison of all four).
    text_runs=()
    for s in 2048 8192; do
        for att in nsa dense; do
            if [[ -f "$RUNS/text-$att-s$s/summary.json" ]]; then
                text_runs+=("$RUNS/text-$att-s$s")
            fi
        done
    done
    "$BIN" compare "${text_runs[@]}" --out "$OUT/text" \
        --title "small on real text: NSA vs dense"
    first=${text_seqs%% *}
    for att in nsa dense; do
        "$BIN" generate "$RUNS/text-$att-s$first" --prompt "The kernel" --max-new-tokens 120 \
            --greedy >"$OUT/text/sample-$att.txt" 2>"$OUT/logs/sample-$att.log" || true
    done
fi

if [[ -n $recall_seqs ]]; then
    # The attentions train side by side (two processes on one GPU: the recall runs' tokens/s
    # are not a speed measurement; the text runs' are).
    pair() { # STAGE-NAME-PATTERN (with @ for the attention) CONFIG [--set ...]
        local pattern=$1 config=$2 pids=() att
        shift 2
        for att in $recall_atts; do
            train "${pattern//@/$att}" "$config" --set "model.attention=\"$att\"" "${@//@/$att}" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
    }
    # Stage 1, once per OUT: the key–value binding at S = 128 (configs/recall-small-short.toml).
    missing=0
    for att in $recall_atts; do [[ -f "$RUNS/recall-$att-short/summary.json" ]] || missing=1; done
    if ((missing)); then
        pair "recall-@-short" "$CONFIGS/recall-small-short.toml"
    fi
    for s in $recall_seqs; do
        recall_runs=()
        evals=()
        # Stage 2 (or 3): each attention continues its own earlier model at length s.
        suffix=s$s
        [[ $recall_from != short ]] && suffix=s$s-from-$recall_from
        [[ -n $stage_suffix ]] && suffix=$stage_suffix
        pair "recall-@-$suffix" "$CONFIGS/recall-small-s$s.toml" \
            --set "run.init_from=\"$RUNS/recall-@-$recall_from\""
        for att in $recall_atts; do
            name="recall-$att-$suffix"
            recall_runs+=("$RUNS/$name")
            # The length the run trained at (TRAIN_ARGS may have changed it).
            trained=$(sed -n 's/^seq_len = //p' "$RUNS/$name/config.toml")
            # 1x, 2x and 4x the trained length; from 16384 up 1x and 2x (4x is 65536 tokens
            # of prefill per sequence: minutes of device time for 64 sequences).
            mults="1 2 4"
            ((trained >= 16384)) && mults="1 2"
            for x in $mults; do
                len=$((trained * x))
                echo "== eval $name at $len"
                # 64 sequences of 8 answers each.
                "$BIN" eval "$RUNS/$name" --task recall --len "$len" --samples 64 --buckets 8 \
                    --json "$OUT/evals/$name-len$len.json" >"$OUT/logs/eval-$name-len$len.log" 2>&1 \
                    || { tail -20 "$OUT/logs/eval-$name-len$len.log"; exit 1; }
                grep -E "accuracy [0-9.]+ over" "$OUT/logs/eval-$name-len$len.log" | sed 's/^.*: step/  step/'
                evals+=(--eval "$OUT/evals/$name-len$len.json")
            done
        done
        "$BIN" compare "${recall_runs[@]}" "${evals[@]}" --out "$OUT/recall-$suffix" \
            --title "recall at a distance, trained at S = $s: NSA vs dense"
    done
fi
echo "results: $OUT/text/compare.md and $OUT/recall-*/compare.md"
