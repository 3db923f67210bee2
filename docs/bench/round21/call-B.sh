#!/bin/bash
# Session 31, call B: every GPU check at main 5fb4eab (nsa-train check --gpu), then, where ncu
# exists, the decode kernels' per-kernel times and the selection kernel's stall reasons at 64k.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-B}; X=$PWD/.gpu31b/nsa-train; L=/tmp/r31/logs; mkdir -p $L; chmod +x $X
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf .gpu31b/kcache.tgz -C $K
timeout 420 $X check --gpu > $L/$P-check.log 2>&1; say "check exit=$?"
tail -1 $L/$P-check.log; grep -c "| pass |" $L/$P-check.log; grep "| FAIL\|| fail" $L/$P-check.log | head
tar czf $OUT/$P-logs.tgz -C $L .
if command -v ncu >/dev/null && (( $(date +%s) - S0 < 470 )); then
  timeout 90 ncu --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-skip 40 --launch-count 8 \
    --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
    $X bench decode --device cuda --seq 65536 --batch 8 --repeats 3 --preset none > $L/$P-ncu-decode.log 2>&1
  say "ncu exit=$?"; grep -E "nsa_dec|Duration|Stall|Memory Throughput" $L/$P-ncu-decode.log | head -40
fi
tar czf $OUT/$P-logs.tgz -C $L .
