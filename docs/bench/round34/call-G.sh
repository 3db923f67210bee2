#!/bin/bash
# Session 45, call G (round 34): the window forward with three warpgroups a CTA at
# dk = dv = 128 and dk = 192, dv = 128 (window_fwd.cu, WGS = 3, 64 keys a tile), on top of the
# slab-tile loader. B holds nsa-main (this build), nsa-old (call F's nsa-main: the loader,
# two warpgroups everywhere) and nsa-x4 (this build with four warpgroups, 123 registers, at
# those two sizes) in bins.tgz and their kernel caches. The GPU check of the new build,
# then each bench for new and old in turn; then per-kernel times of the window branch's
# fwd+bwd (Nsight Compute, durations only) to see where the branch spends what its kernels
# do not; last, racecheck and memcheck over the window part of the check.
B=${B:-.gpu46}; P=G; LIM=${LIM:-420}
source docs/bench/call-lib.sh
step() {  # name, seconds, command...: skipped when fewer than its seconds are left
  local n=$1 t=$2; shift 2
  [ "$(left)" -gt "$t" ] || { say "skip $n"; return; }
  timeout "$t" "$@" > "$OUT/$P-$n.log" 2>&1; say "$n rc=$?"
  grep -E "FAILS|FAIL |ERROR SUMMARY" "$OUT/$P-$n.log" | head -8 >> "$OUT/$P-summary.txt"
}
step check 40 $B/nsa-main check --gpu --part window,layer,sync; tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
step check-x4 30 $B/nsa-x4 check --gpu --part window; tail -1 "$OUT/$P-check-x4.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check-x4.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
for v in main x4 old; do
  step branches-paper-$v 20 $B/nsa-$v bench branches --branch window --shape paper --seq 16384,65536 --repeats 5
  [ $v = x4 ] || step branches-125m-$v 15 $B/nsa-$v bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5
  grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*-$v.log | grep "fused |" | sort -u | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
for v in main old; do
  step attn-$v 25 $B/nsa-$v bench attn --path fused --seq 65536 --repeats 3; grep -E "^\| 65536" "$OUT/$P-attn-$v.log" | cut -d"|" -f1-6 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
for v in main old; do
  step train-$v 40 $B/nsa-$v bench train --device cuda --preset 125m --seq 8192,32768 --steps 4; grep -E "^\|" "$OUT/$P-train-$v.log" | tail -4 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
if [ -n "$NCU" ]; then
  step ncu-branch 60 "$NCU" --cache-control none --clock-control none --metrics gpu__time_duration.sum \
    --launch-count 60 $B/nsa-main bench branches --branch window --shape paper --seq 65536 --repeats 1
  grep -E "^  [A-Za-z_].*\(|gpu__time_duration" "$OUT/$P-ncu-branch.log" | paste - - | \
    awk '{n=$1; print n, $NF}' | cut -c1-150 >> "$OUT/$P-summary.txt"
fi
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
step racecheck 80 $CS --tool racecheck $B/nsa-main check --gpu --part window; tail -3 "$OUT/$P-racecheck.log" >> "$OUT/$P-summary.txt"
step memcheck 60 $CS --tool memcheck $B/nsa-main check --gpu --part window; tail -3 "$OUT/$P-memcheck.log" >> "$OUT/$P-summary.txt"
summarize
