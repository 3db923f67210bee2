#!/bin/bash
# Session 31, call D: the decode step's window tiles on a side stream beside the selection
# kernel. new = main + that change, old = 5fb4eab. check --gpu --part decode on new, then
# bench decode (layer step, paper and 125m shapes) old/new/old/new, then 125m generation after
# a 32k prompt, old and new.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-D}; L=/tmp/r31/logs; mkdir -p $L; B=$PWD/.gpu31d; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
$B/nsa-new kernels > $L/$P-kernels.log 2>&1; say "kernels exit=$?"
timeout 150 $B/nsa-new check --gpu --part decode > $L/$P-check-decode.log 2>&1; say "check exit=$?"
tail -1 $L/$P-check-decode.log; grep -iE "\| fail" $L/$P-check-decode.log | head; pack
for r in 1 2; do for v in old new; do
  timeout 120 $B/nsa-$v bench decode --device cuda --shape paper,125m --batch 1,8 --repeats 20 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
for v in old new; do
  timeout 100 $B/nsa-$v bench decode --device cuda --seq 8192 --batch 1 --repeats 3 --preset 125m --prompt 32768 --new-tokens 64 > $L/$P-gen-$v.log 2>&1
  say "gen $v exit=$?"; pack
done
for v in old new; do echo "== $v"; grep -E "^\| (65536|131072|8192) " $L/$P-bench-$v-2.log | cut -c1-160; grep -A4 "tokens/s" $L/$P-gen-$v.log | grep -E "^\| 125m" ; done
pack
