#!/bin/bash
# Session 38, call B: the decode table at e4a805f (the prologue's gates by warps and the refill
# by gathers, both landed) over 8k-128k cached tokens, paper and 125m shapes, batch 1 and 8,
# with 125m generation after a 32k prompt.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu37; P=B
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
timeout 280 $B/nsa-e4a bench decode --device cuda --seq 8192,16384,32768,65536,131072 --shape paper,125m \
  --batch 1,8 --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-e4a.log 2>&1
echo "bench rc=$?" >> $OUT/$P-device.txt
cat $OUT/$P-device.txt
grep -E "^\| (paper|125m) \| [0-9]" $OUT/$P-bench-e4a.log | cut -d'|' -f2-4,6,7,10,11,12
grep -E "^\| 125m \| (nsa|dense)" $OUT/$P-bench-e4a.log
