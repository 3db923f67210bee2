#!/bin/bash
# Session 43, call A (round 32): the wgmma window backward. The harness over the kernels' cubin
# (parity with fp32 autograd on fresh random inputs, flash's own backward beside it; times
# against flash's backward; memcheck on two small cases), then the built binary: the window,
# layer and sync parts of the GPU check, bench branches (window) at the paper and 125m shapes,
# the layer at 64k, 125m training.
B=.gpu43; P=A; LIM=500
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
timeout 150 $PY docs/bench/round32/wb_harness.py $B/wb.cubin check > "$OUT/$P-harness-check.log" 2>&1
say "harness check rc=$?"; tail -1 "$OUT/$P-harness-check.log" >> "$OUT/$P-summary.txt"
grep FAIL "$OUT/$P-harness-check.log" | head -8 >> "$OUT/$P-summary.txt"
timeout 100 $PY docs/bench/round32/wb_harness.py $B/wb.cubin bench > "$OUT/$P-harness-bench.log" 2>&1
say "harness bench rc=$?"; cat "$OUT/$P-harness-bench.log" >> "$OUT/$P-summary.txt"
timeout 90 compute-sanitizer --tool memcheck $PY docs/bench/round32/wb_harness.py $B/wb.cubin small > "$OUT/$P-memcheck.log" 2>&1
say "memcheck rc=$?"; tail -2 "$OUT/$P-memcheck.log" >> "$OUT/$P-summary.txt"
cuobjdump --dump-sass $B/wb.cubin > "$OUT/$P-sass.txt" 2>&1; say "HGMMA lines $(grep -c HGMMA "$OUT/$P-sass.txt")"
timeout 120 $B/nsa-main check --gpu --part window,layer,sync > "$OUT/$P-check.log" 2>&1
say "check window,layer,sync rc=$?"
tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
timeout 40 $B/nsa-main bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5 > "$OUT/$P-branches-125m-b4.log" 2>&1
timeout 60 $B/nsa-main bench branches --branch window --shape paper --seq 65536 --repeats 5 > "$OUT/$P-branches-paper.log" 2>&1
say "branches rc=$?"
grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*.log | sort -u >> "$OUT/$P-summary.txt"
[ "$(left)" -gt 70 ] && { timeout 60 $B/nsa-main bench attn --path fused --seq 65536 --repeats 3 > "$OUT/$P-attn.log" 2>&1; say "attn rc=$?"; grep -E "^\|" "$OUT/$P-attn.log" | tail -4 >> "$OUT/$P-summary.txt"; }
[ "$(left)" -gt 60 ] && { timeout $(( $(left) - 15 )) $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4 > "$OUT/$P-train.log" 2>&1; say "train rc=$?"; grep -E "^\|" "$OUT/$P-train.log" | tail -6 >> "$OUT/$P-summary.txt"; }
summarize
