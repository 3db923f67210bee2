#!/bin/bash
# Session 32, call E. tiles2 = cca419d (selection in slices, the tile kernels' ldmatrix
# fragments); waves = + the selected/window launch's tiles per CTA raised until the two
# branches' partials fit the resident CTAs once. Every GPU check on waves, bench decode at 64k
# tiles2/waves twice, 125m generation after a 32k prompt on each, then both whole decode sweeps.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-E}; L=/tmp/r32/logs; mkdir -p $L; B=$PWD/.gpu32; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
$B/nsa-waves kernels > $L/$P-kernels.log 2>&1; grep -c compiled $L/$P-kernels.log
timeout 150 $B/nsa-waves check --gpu > $L/$P-check-waves.log 2>&1; say "check waves exit=$?"; tail -1 $L/$P-check-waves.log
grep -iE "\| fail" $L/$P-check-*.log | head; pack
for r in 1 2; do for v in tiles2 waves; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1
  say "bench $v $r exit=$?"; pack
done; done
for v in tiles2 waves; do
  timeout 60 $B/nsa-$v bench decode --device cuda --seq 8192 --batch 1 --repeats 1 --preset 125m --prompt 32768 --new-tokens 64 > $L/$P-gen-$v.log 2>&1
  say "gen $v exit=$?"; pack
done
for v in waves tiles2; do
  timeout 120 $B/nsa-$v bench decode --device cuda --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-sweep-$v.log 2>&1; say "sweep $v exit=$?"; pack
done
for v in tiles2 waves; do for r in 1 2; do echo "== $v $r"; grep -E "^\| (paper|125m) \| 65536" $L/$P-bench-$v-$r.log | awk -F'|' '{print $2,$4,"graph",$8,"eager",$7,"dense",$10}' | sort -u; done; grep -E "^\| 125m \| (nsa|dense) " $L/$P-gen-$v.log | sort -u; done
