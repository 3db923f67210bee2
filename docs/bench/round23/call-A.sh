#!/bin/bash
# Session 34, call A. Bundle .gpu34 (cargo xtask variants): main = ee82560; combine = the online
# combine; bulk = score pairs, padded merge rows and sm_90 bulk copies in the compressed tiles;
# pdl = main + programmatic dependent launches; all = bulk + combine + pdl.
# Decode checks on main and all (the others only if all fails), bench decode at 64k for each
# variant twice (alternated), the launch sweep on pdl and all.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch; export LD_LIBRARY_PATH=$T/lib
P=A; V=/tmp/variants; L=/tmp/r34/logs; mkdir -p $V $L ~/.cache/nsa/kernels
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $L/$P-device.txt
tar xzf .gpu34/variants.tgz -C $V && cp -r $V/kcache/. ~/.cache/nsa/kernels/
cp .gpu34/variants.txt $L/$P-variants.txt
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for v in main all; do timeout 150 $V/nsa-$v check --gpu --part decode > $L/$P-check-$v.log 2>&1; say "check $v rc=$?"; tail -1 $L/$P-check-$v.log; done
if ! grep -q "GPU checks passed" $L/$P-check-all.log; then
  for v in pdl combine bulk; do timeout 150 $V/nsa-$v check --gpu --part decode > $L/$P-check-$v.log 2>&1; say "check $v rc=$?"; tail -1 $L/$P-check-$v.log; done
fi
grep -hiE "\| fail" $L/$P-check-*.log | head; pack
for r in 1 2; do for v in main combine bulk pdl all; do
  timeout 60 $V/nsa-$v bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-bench-$v-$r.log 2>&1; say "bench $v $r rc=$?"
done; pack; done
for v in pdl all; do timeout 150 $V/nsa-$v bench decode-launch --device cuda --seq 16384,65536 --batch 1,8 --tile-ctas 132,528 --select-slices 1,4 --programmatic off --repeats 10 > $L/$P-launch-$v.log 2>&1; say "launch $v rc=$?"; done; pack
# Per-kernel times (ncu serialises the launches) while the call's time allows.
for v in main all; do for bt in 8 1; do
  [ $(( $(date +%s) - S0 )) -lt 470 ] || break
  timeout 45 ncu --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 8 $V/nsa-$v bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none > $L/$P-ncu-$v-b$bt.log 2>&1; say "ncu $v b$bt rc=$?"
done; done; pack
for v in main combine bulk pdl all; do echo "== $v"; grep -hE "^\| (paper|125m) \| 65536" $L/$P-bench-$v-*.log | awk -F'|' '{print $2,$4,"graph",$8,"dense",$10}'; done
grep -hE "device's pick \||programmatic off \|" $L/$P-launch-*.log | awk -F'|' '{print $2,$3,$4,$5,$9,$10,$12}'
for f in $L/$P-ncu-*.log; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | head -16 | paste - - | awk '{print $1, $(NF)}'; done
