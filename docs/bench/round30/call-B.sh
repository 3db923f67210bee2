#!/bin/bash
# Session 41, call B (round 30): the selection kernel lets the attend kernel launch at its
# start (griddepcontrol.launch_dependents before its wait), so that the window CTAs run beside
# the compressed tiles: pdl = main + that line, lspdl = pdl + decode-tiles-load-shared.diff.
# Decode check on lspdl and pdl; the 64k decode bench alternated main / lspdl / pdl; every
# cache length on main and lspdl.
B=.gpu41; P=B; LIM=560
source docs/bench/call-lib.sh
check_part lspdl decode
check_part pdl decode
for r in 1 2; do for v in main lspdl pdl; do bench_decode $v $r; done; done
for v in main lspdl; do
  [ "$(left)" -gt 40 ] || break
  timeout 60 "$B/nsa-$v" bench decode --device cuda --seq 8192,16384,32768,65536,131072 \
    --shape paper --batch 1,8 --repeats 10 --preset none > "$OUT/$P-bench-$v-lens.log" 2>&1
  say "lens $v rc=$?"
done
summarize
