#!/bin/bash
# Session 44, call E (round 33, second part; prepared, it found no machine): the slab-tile
# loader with one swizzle a thread (slab-loader.diff applied to 3d669e1: wgmma.cuh's
# load_slab_tile). wf_fl / wb_fl: window_fwd.cu / window_bwd.cu with the diff, by NVRTC
# (round 31's nvrtc_build.py, sm_90a); wf_old / wb_old: 3d669e1's; wf_wg3: x_window_fwd_wg3.cu
# (three warpgroups a CTA) with the diff; nsa-main in bins.tgz: the release build with the diff.
# prepare-E.sh builds them all into a folder (B=that folder; pass it in carry). Harness parity and times (old against new), then the window,
# layer and sync parts of the GPU check, bench branches (window), the layer at 64k, training.
B=${B:-.gpu44}; P=E; LIM=${LIM:-230}
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
H=docs/bench/round33/wf2_harness.py
W=docs/bench/round33/wb2_harness.py
C="$B/wf_fl.cubin $B/wf_old.cubin $B/wf_wg3.cubin head"
step() {  # name, seconds, command...: skipped when fewer than its seconds are left
  local n=$1 t=$2; shift 2
  [ "$(left)" -gt "$t" ] || { say "skip $n"; return; }
  timeout "$t" "$@" > "$OUT/$P-$n.log" 2>&1; say "$n rc=$?"
  grep -E "FAILS|FAIL |ERROR SUMMARY" "$OUT/$P-$n.log" | head -8 >> "$OUT/$P-summary.txt"
}
step fwd-check 40 $PY $H check $C
step fwd-bench 40 $PY $H bench $C; cat "$OUT/$P-fwd-bench.log" >> "$OUT/$P-summary.txt"
step bwd-check 50 $PY $W $B/wb_fl.cubin check
step bwd-bench 50 $PY $W $B/wb_fl.cubin bench $B/wb_old.cubin; grep -v "old vs" "$OUT/$P-bwd-bench.log" | tail -30 >> "$OUT/$P-summary.txt"
step check 40 $B/nsa-main check --gpu --part window,layer,sync; tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
step branches-paper 20 $B/nsa-main bench branches --branch window --shape paper --seq 65536 --repeats 5
step branches-125m 15 $B/nsa-main bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5
grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*.log | sort -u >> "$OUT/$P-summary.txt"
step attn 25 $B/nsa-main bench attn --path fused --seq 65536 --repeats 3; grep -E "^\|" "$OUT/$P-attn.log" | tail -5 >> "$OUT/$P-summary.txt"
step train 40 $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4; grep -E "^\|" "$OUT/$P-train.log" | tail -4 >> "$OUT/$P-summary.txt"
summarize
