#!/bin/bash
# Session 42, call C (round 31): the landed build (64-key tiles, the plain loop, at dk = dv =
# 64; the pipelined loop removed): the window, layer and sync parts of the GPU check, bench
# branches (window) at the paper shape (64k) and the 125m shape, 125m training.
B=.gpu42; P=C; LIM=250
source docs/bench/call-lib.sh
timeout 100 $B/nsa-main check --gpu --part window,layer,sync > "$OUT/$P-check.log" 2>&1
say "check window,layer,sync rc=$?"
tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
timeout 40 $B/nsa-main bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5 > "$OUT/$P-branches-125m-b4.log" 2>&1
timeout 40 $B/nsa-main bench branches --branch window --shape 125m --seq 32768 --repeats 5 > "$OUT/$P-branches-125m-b1.log" 2>&1
timeout 40 $B/nsa-main bench branches --branch window --shape paper --seq 65536 --repeats 5 > "$OUT/$P-branches-paper.log" 2>&1
say "branches rc=$?"
grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*.log | sort -u >> "$OUT/$P-summary.txt"
[ "$(left)" -gt 60 ] && { timeout $(( $(left) - 15 )) $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4 > "$OUT/$P-train.log" 2>&1; say "train rc=$?"; grep -E "^\|" "$OUT/$P-train.log" | tail -6 >> "$OUT/$P-summary.txt"; }
summarize
