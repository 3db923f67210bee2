#!/bin/bash
# Session 42, call E (round 31): the committed build (the audit names the wgmma window
# forward; the layer and sync checks accept it): every GPU check part but decode, and the
# layer bench's audit line at 8k.
B=.gpu42; P=E; LIM=215
source docs/bench/call-lib.sh
timeout 170 $B/nsa-main check --gpu --part kernels > "$OUT/$P-check.log" 2>&1
say "check kernels rc=$?"
tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
timeout 30 $B/nsa-main bench attn --path fused --seq 8192 --repeats 3 > "$OUT/$P-attn.log" 2>&1
say "attn rc=$?"; grep -E "^\| 8192 \| nsa fwd \|" "$OUT/$P-attn.log" | cut -c1-400 >> "$OUT/$P-summary.txt"
summarize
