#!/bin/bash
# Session 32, call B. base = 73fc6df (selection top n by warp bitonic lists, one CTA per group);
# slice = + the selection in slices over several CTAs with a merge by the last (6263ae7);
# carve = slice + the decode kernels' preferred shared-memory carveout at 100 %.
# Checks (slice: decode part; carve: every part), bench decode at 64k base/slice/carve twice,
# ncu of the step's kernels (slice, carve), ncu --set full of the tile kernels and the selection.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-B}; L=/tmp/r32/logs; mkdir -p $L; B=$PWD/.gpu32; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for v in base slice; do $B/nsa-$v kernels > $L/$P-kernels-$v.log 2>&1; say "kernels $v exit=$?"; done
grep -c compiled $L/$P-kernels-*.log
timeout 100 $B/nsa-slice check --gpu --part decode > $L/$P-check-decode-slice.log 2>&1; say "check slice exit=$?"; tail -1 $L/$P-check-decode-slice.log
timeout 200 $B/nsa-carve check --gpu > $L/$P-check-carve.log 2>&1; say "check carve exit=$?"; tail -1 $L/$P-check-carve.log
grep -iE "\| fail" $L/$P-check-*.log | head; pack
for r in 1 2; do for v in base slice carve; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
for v in slice carve; do
  timeout 60 ncu --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 8 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none > $L/$P-ncu-$v.log 2>&1
  say "ncu $v exit=$?"; pack
done
for k in nsa_dec_cmp nsa_dec_attend nsa_dec_scores; do
  timeout 100 ncu --set full --import-source yes --cache-control none --clock-control none --kernel-name regex:$k --launch-skip 2 --launch-count 1 -o $L/$P-$k $B/nsa-carve bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none > $L/$P-ncu-$k.log 2>&1
  say "ncu full $k exit=$?"
  ncu -i $L/$P-$k.ncu-rep --page details > $L/$P-$k-details.txt 2>&1
  ncu -i $L/$P-$k.ncu-rep --page source --csv --print-source sass > $L/$P-$k-sass.csv 2>&1
  rm -f $L/$P-$k.ncu-rep; pack
done
for v in base slice carve; do echo "== $v"; grep -E "^\| (paper|125m) " $L/$P-bench-$v-2.log | cut -d'|' -f2-8,12; done
for v in slice carve; do echo "== ncu $v"; grep -E "^  nsa_dec|Duration" $L/$P-ncu-$v.log | head -8; done
