#!/bin/bash
# Session 32, call A: the decode selection's top n by warp bitonic lists (select_top_n_warps).
# new = main + that change, old = d483964. Every GPU check on new, then bench decode at 64k
# (paper and 125m, batch 1 and 8) old/new/old/new, ncu of the selection kernel old and new,
# and new's whole decode sweep.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-A}; L=/tmp/r32/logs; mkdir -p $L; B=$PWD/.gpu32; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
$B/nsa-new kernels > $L/$P-kernels.log 2>&1; say "kernels exit=$?"
timeout 240 $B/nsa-new check --gpu > $L/$P-check.log 2>&1; say "check exit=$?"
tail -2 $L/$P-check.log; grep -iE "\| fail" $L/$P-check.log | head; pack
for r in 1 2; do for v in old new; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
if command -v ncu >/dev/null; then for v in old new; do
  timeout 60 ncu --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 8 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none > $L/$P-ncu-$v.log 2>&1
  say "ncu $v exit=$?"; pack
done; fi
timeout 170 $B/nsa-new bench decode --device cuda --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-sweep-new.log 2>&1; say "sweep exit=$?"; pack
for v in old new; do echo "== $v"; grep -E "^\| " $L/$P-bench-$v-2.log | cut -c1-170 | head -8; done
for v in old new; do echo "== ncu $v"; grep -E "nsa_dec_scores|Duration" $L/$P-ncu-$v.log | head -8; done
pack
