#!/bin/bash
# Session 32, call C. slice = b23074d (selection in slices); tiles = + the decode tile kernels'
# copies by lane pairs per row, Q K^T fragments by ldmatrix, no rescale by exactly one.
# Every GPU check on tiles, bench decode at 64k slice/tiles twice, ncu of tiles' step kernels,
# 125m generation after a 32k prompt slice/tiles, then tiles' whole decode sweep.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-C}; L=/tmp/r32/logs; mkdir -p $L; B=$PWD/.gpu32; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for v in slice tiles; do $B/nsa-$v kernels > $L/$P-kernels-$v.log 2>&1; done; grep -c compiled $L/$P-kernels-*.log
timeout 200 $B/nsa-tiles check --gpu > $L/$P-check-tiles.log 2>&1; say "check tiles exit=$?"; tail -1 $L/$P-check-tiles.log
grep -iE "\| fail" $L/$P-check-*.log | head; pack
for r in 1 2; do for v in slice tiles; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
timeout 60 ncu --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 8 $B/nsa-tiles bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none > $L/$P-ncu-tiles.log 2>&1; say "ncu exit=$?"
for v in slice tiles; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 8192 --batch 1 --repeats 1 --preset 125m --prompt 32768 --new-tokens 64 > $L/$P-gen-$v.log 2>&1
  say "gen $v exit=$?"; pack
done
timeout 170 $B/nsa-tiles bench decode --device cuda --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-sweep-tiles.log 2>&1; say "sweep exit=$?"; pack
for v in slice tiles; do for r in 1 2; do echo "== $v $r"; grep -E "^\| (paper|125m) \| 65536" $L/$P-bench-$v-$r.log | awk -F'|' '{print $2,$4,"graph",$8,"eager",$7,"dense",$10}' | sort -u; done; grep -E "^\| 125m \| (nsa|dense) " $L/$P-gen-$v.log | sort -u; done
grep -E "^  nsa_dec|Duration" $L/$P-ncu-tiles.log | head -8
