#!/bin/bash
# Session 41, call E (round 30): v2 / v1 = main 998d7bd + decode-compressed-values-split.diff
# with the value CTAs taking VALUE_TILE_SHARE = 2 / 1 times the selected and window CTAs'
# tiles each (call D's split build took tpc_cmp tiles each: 16 at 64k x 8). Decode checks on
# both; 64k bench alternated main / v2 / v1; every cache length on v2 and v1; ncu of v2 at x 8.
B=.gpu41; P=E; LIM=420
source docs/bench/call-lib.sh
check_part v2 decode
check_part v1 decode
for r in 1 2; do for v in main v2 v1; do bench_decode $v $r; done; done
for v in v2 v1; do
  [ "$(left)" -gt 70 ] || break
  timeout 70 "$B/nsa-$v" bench decode --device cuda --seq 8192,16384,32768,65536,131072 \
    --shape paper --batch 1,8 --repeats 10 --preset none > "$OUT/$P-bench-$v-lens.log" 2>&1
  say "lens $v rc=$?"
done
ncu_decode v2 8
summarize
