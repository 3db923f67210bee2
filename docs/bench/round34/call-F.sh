#!/bin/bash
# Session 45, call F (round 34): round 33's call E (the slab-tile loader, slab-loader.diff) with
# the landed build beside it, so that every timing has its baseline from the same machine.
# B holds prepare-E.sh's cubins and kernel cache plus, in bins.tgz, nsa-main (the build with the
# diff) and nsa-old (session 43's build of the landed kernels, .gpu43/bins.tgz) and both kernel
# caches. Harness parity and times first, then the GPU check of the new build, then each bench
# for new and old in turn.
B=${B:-.gpu45}; P=F; LIM=${LIM:-420}
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
for v in main old; do
  step branches-paper-$v 20 $B/nsa-$v bench branches --branch window --shape paper --seq 65536 --repeats 5
  step branches-125m-$v 15 $B/nsa-$v bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5
  grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*-$v.log | sort -u | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
for v in main old; do
  step attn-$v 25 $B/nsa-$v bench attn --path fused --seq 65536 --repeats 3; grep -E "^\|" "$OUT/$P-attn-$v.log" | tail -3 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
for v in main old; do
  step train-$v 40 $B/nsa-$v bench train --device cuda --preset 125m --seq 8192,32768 --steps 4; grep -E "^\|" "$OUT/$P-train-$v.log" | tail -4 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
summarize
