#!/bin/bash
# Session 40, call F (round 29): the landed decode kernels on an H200, every cache length.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu40; P=F
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
timeout 80 $B/nsa-final bench decode --device cuda --seq 8192,16384,32768,65536,131072 --shape paper \
  --batch 1,8 --repeats 10 --preset none > $OUT/$P-full-final.log 2>&1; echo "full rc=$?"
cat $OUT/$P-device.txt; grep -E "^\| paper \| [0-9]" $OUT/$P-full-final.log | sort -u | awk -F'|' '{print $3,$4,"graph",$6,"attn",$9,"dense",$11,"ratio",$12}'
