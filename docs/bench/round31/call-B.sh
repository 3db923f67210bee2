#!/bin/bash
# Session 42, call B (round 31): the wgmma window forward as landed. (1) wf_harness.py on the
# cubin of window_fwd.cu plus experimental instantiations (x_*: other tile widths and loops);
# (2) the window, layer and sync parts of the GPU check; (3) bench branches (window) at the
# paper shape, 8k..128k, and the 125m shape at 8k x 4 and 32k; (4) the paper layer at 64k;
# (5) 125m training, NSA and dense, at 8k x 4 and 32k.
B=.gpu42; P=B; LIM=430
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
timeout 100 $PY $B/wf_harness.py $B/wf.cubin > "$OUT/$P-harness.log" 2>&1
say "harness rc=$? ok=$(grep -c '^ok' $OUT/$P-harness.log)"
grep -v "^ok" "$OUT/$P-harness.log" | tail -28 >> "$OUT/$P-summary.txt"
timeout 200 $B/nsa-main check --gpu --part window,layer,sync > "$OUT/$P-check.log" 2>&1
say "check window,layer,sync rc=$?"
tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
timeout 150 $B/nsa-main bench branches --branch window --shape paper --seq 8192,16384,32768,65536,131072 --repeats 5 > "$OUT/$P-branches-paper.log" 2>&1
say "branches paper rc=$?"
timeout 60 $B/nsa-main bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5 > "$OUT/$P-branches-125m-b4.log" 2>&1
timeout 60 $B/nsa-main bench branches --branch window --shape 125m --seq 32768 --repeats 5 > "$OUT/$P-branches-125m-b1.log" 2>&1
say "branches 125m rc=$?"
grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*.log | sort -u >> "$OUT/$P-summary.txt"
[ "$(left)" -gt 120 ] && { timeout 100 $B/nsa-main bench attn --path fused --seq 65536 --repeats 3 > "$OUT/$P-attn.log" 2>&1; say "attn rc=$?"; grep -E "^\|" "$OUT/$P-attn.log" | tail -6 >> "$OUT/$P-summary.txt"; }
[ "$(left)" -gt 150 ] && { timeout $(( $(left) - 20 )) $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4 > "$OUT/$P-train.log" 2>&1; say "train rc=$?"; grep -E "^\|" "$OUT/$P-train.log" | tail -8 >> "$OUT/$P-summary.txt"; }
summarize
