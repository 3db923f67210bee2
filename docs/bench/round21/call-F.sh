#!/bin/bash
# Session 31, call F: where a 125m training step's GPU time goes now (main's code, c57cd74
# build), NSA and dense at 8k x 4, NSA and dense at 32k x 1: 5 steps, steps 4-5 profiled,
# summarised by scripts/trace_summary.py.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-F}; L=/tmp/r31/logs; mkdir -p $L; B=$PWD/.gpu31d; X=$B/nsa-old; chmod +x $X
PY=/opt/torch/.venv/bin/python3; [[ -x $PY ]] || PY=python3
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for spec in nsa:8192:4 dense:8192:4 nsa:32768:1 dense:32768:1; do
  IFS=: read att s b <<< "$spec"; n=prof-$att-$s
  timeout 100 $X train --name $n --overwrite --set run.out_dir=\"/tmp/prof\" --set model.preset=\"125m\" --set model.attention=\"$att\" \
    --set data.seq_len=$s --set data.batch_size=$b --steps 5 --profile 4..5 --nvtx > $L/$P-$n.log 2>&1
  say "$n exit=$?"
  $PY $B/trace_summary.py /tmp/prof/$n/trace-steps-4-5.json $n --top 25 > $L/$P-profile-$n.txt 2>&1
  head -22 $L/$P-profile-$n.txt; pack
done
pack
