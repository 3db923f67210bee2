#!/bin/bash
# Session 41, call D (round 30): split = main 998d7bd + decode-compressed-values-split.diff (the
# warp-level kernels' compressed launch computes only the scores and lse2; the attend launch's
# first CTAs take the compressed values with p = exp2(s - lse2), beside the window tiles and
# while the selection runs). Decode check on split; 64k bench alternated with main; ncu
# per-kernel durations; every cache length on both.
B=.gpu41; P=D; LIM=560
source docs/bench/call-lib.sh
check_part split decode
for r in 1 2; do for v in main split; do bench_decode $v $r; done; done
for b in 8 1; do ncu_decode split $b; done
for v in main split; do
  [ "$(left)" -gt 70 ] || break
  timeout 70 "$B/nsa-$v" bench decode --device cuda --seq 8192,16384,32768,65536,131072 \
    --shape paper --batch 1,8 --repeats 10 --preset none > "$OUT/$P-bench-$v-lens.log" 2>&1
  say "lens $v rc=$?"
done
summarize
