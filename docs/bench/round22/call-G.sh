#!/bin/bash
# Session 32, call G (branch wip/decode-l2-prefetch). waves = 0486e6d; pref = + each warp of the
# decode tile kernels prefetches the tile after the next into L2 (cp.async.bulk.prefetch.L2).
# The decode checks on pref, bench decode at 64k waves/pref twice.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-G}; L=/tmp/r32/logs; mkdir -p $L; B=$PWD/.gpu32; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
timeout 60 $B/nsa-pref check --gpu --part decode > $L/$P-check-decode-pref.log 2>&1; say "check pref exit=$?"; tail -1 $L/$P-check-decode-pref.log
grep -iE "\| fail" $L/$P-check-*.log | head; pack
for r in 1 2; do for v in waves pref; do
  timeout 30 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
for v in waves pref; do for r in 1 2; do echo "== $v $r"; grep -E "^\| (paper|125m) \| 65536" $L/$P-bench-$v-$r.log | awk -F'|' '{print $2,$4,"graph",$8,"eager",$7,"dense",$10}' | sort -u; done; done
