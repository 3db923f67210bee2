#!/bin/bash
# Session 32, call D. slice = b23074d (selection in slices); tiles2 = + Q K^T fragments by
# ldmatrix, no rescale by exactly one (the copies as before). The decode checks on tiles2, bench
# decode at 64k slice/tiles2 twice, ncu of tiles2's step kernels.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-D}; L=/tmp/r32/logs; mkdir -p $L; B=$PWD/.gpu32; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for v in slice tiles2; do $B/nsa-$v kernels > $L/$P-kernels-$v.log 2>&1; done; grep -c compiled $L/$P-kernels-*.log
timeout 100 $B/nsa-tiles2 check --gpu --part decode > $L/$P-check-tiles2.log 2>&1; say "check tiles exit=$?"; tail -1 $L/$P-check-tiles2.log
grep -iE "\| fail" $L/$P-check-*.log | head; pack
for r in 1 2; do for v in slice tiles2; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
timeout 60 ncu --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 8 $B/nsa-tiles2 bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none > $L/$P-ncu-tiles2.log 2>&1; say "ncu exit=$?"
for v in slice tiles2; do for r in 1 2; do echo "== $v $r"; grep -E "^\| (paper|125m) \| 65536" $L/$P-bench-$v-$r.log | awk -F'|' '{print $2,$4,"graph",$8,"eager",$7,"dense",$10}' | sort -u; done; done
grep -E "^  nsa_dec|Duration" $L/$P-ncu-tiles2.log | head -8
