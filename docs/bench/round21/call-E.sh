#!/bin/bash
# Session 31, call E: the side-stream window tiles measured to the microsecond. old = main
# 6e2c1a9-like (bench decode printing 3 decimals, no side stream), new = the same plus the side
# stream. Layer table at 64k (paper and 125m shapes, batch 1 and 8), old/new/old/new; then 125m
# generation after a 32k prompt, old/new/old/new.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-E}; L=/tmp/r31/logs; mkdir -p $L; B=$PWD/.gpu31d; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for v in old new; do $B/nsa-$v kernels > $L/$P-kernels-$v.log 2>&1; say "kernels $v exit=$?"; done
for r in 1 2; do for v in old new; do
  timeout 75 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
for r in 1 2; do for v in old new; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 8192 --batch 1 --repeats 1 --preset 125m --prompt 32768 --new-tokens 64 > $L/$P-gen-$v-$r.log 2>&1
  say "gen $v $r exit=$?"; pack
done; done
for v in old new; do for r in 1 2; do echo "== $v $r"; grep -E "^\| (paper|125m) \| 65536" $L/$P-bench-$v-$r.log | awk -F'|' '{print $2,$4,"graph",$8,"eager",$7,"dense",$9}'; grep -E "^\| 125m \| nsa" $L/$P-gen-$v-$r.log; done; done
pack
