#!/bin/bash
# Session 31, call G: the decode selection in slices of 256 blocks (a CTA each, the last CTA
# per group merging the slices' best) instead of one CTA of 1024 threads per group.
# new = that change, old = c57cd74. check --gpu --part decode on new (a new row selects over
# two slices), then, if it passes, bench decode at 64k old/new/old/new.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-G}; L=/tmp/r31/logs; mkdir -p $L; B=$PWD/.gpu31d; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
timeout 120 $B/nsa-new check --gpu --part decode > $L/$P-check-decode.log 2>&1; rc=$?; say "check exit=$rc"
tail -1 $L/$P-check-decode.log; grep -iE "\| fail|slices|l'=8" $L/$P-check-decode.log | cut -c1-200; pack
if [[ $rc == 0 ]]; then
  for r in 1 2; do for v in old new; do
    timeout 40 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
    say "bench $v $r exit=$?"; pack
  done; done
  for v in old new; do for r in 1 2; do echo "== $v $r"; grep -E "^\| (paper|125m) \| 65536" $L/$P-bench-$v-$r.log | awk -F'|' '{print $2,$4,"graph",$8,"eager",$7}' | sort -u; done; done
fi
pack
