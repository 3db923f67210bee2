#!/bin/bash
# Session 44, call B (round 33, H200, run inline): the landed kernels (session 43's release build
# in .gpu43, the kernels' machine code as at 3d669e1) on the H200: bench branches (window) at
# the paper and 125m shapes, the layer at 64k, 125m training.
B=.gpu43; P=B; LIM=200; source docs/bench/call-lib.sh
timeout 40 $B/nsa-main bench branches --branch window --shape paper --seq 65536 --repeats 5 > $OUT/B-branches-paper.log 2>&1; say "br rc=$?"
timeout 30 $B/nsa-main bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5 > $OUT/B-branches-125m.log 2>&1
grep -hE "^\| (paper|125m)" $OUT/B-branches-*.log >> $OUT/B-summary.txt
timeout 50 $B/nsa-main bench attn --path fused --seq 65536 --repeats 3 > $OUT/B-attn.log 2>&1; say "attn rc=$?"
grep -E "^\|" $OUT/B-attn.log | tail -5 >> $OUT/B-summary.txt
timeout 70 $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4 > $OUT/B-train.log 2>&1; say "train rc=$?"
grep -E "^\|" $OUT/B-train.log | tail -4 >> $OUT/B-summary.txt
summarize
