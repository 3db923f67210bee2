#!/bin/bash
# Session 41, call C (round 30): how long the compressed decode tiles take without their V
# bytes (konly = main 998d7bd + cmp-without-v-copies.diff: the compressed kernel skips the V
# rows' copies and keeps all its arithmetic; wrong outputs, a timing probe only): decode bench
# alternated with main, and ncu's per-kernel durations at 64k x 8 and x 1.
B=.gpu41; P=C; LIM=400
source docs/bench/call-lib.sh
for r in 1 2; do for v in main konly; do bench_decode $v $r; done; done
for v in main konly; do for b in 8 1; do ncu_decode $v $b; done; done
summarize
