#!/bin/bash
# Session 36, call A: where the NSA-only time of a 125m training step goes outside the attention
# kernels (elementwise, reductions, copies), by the CPU op chain that launched it: 5 steps,
# steps 4-5 profiled, summarised by scripts/trace_summary.py with --kernel.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-A}; L=/tmp/r36/logs; mkdir -p $L; B=$PWD/.gpu36; X=$B/nsa-head; chmod +x $X
PY=/opt/torch/.venv/bin/python3; [[ -x $PY ]] || PY=python3
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for spec in nsa:8192:4 nsa:32768:1; do
  IFS=: read att s b <<< "$spec"; n=prof-$att-$s
  timeout 150 $X train --name $n --overwrite --set run.out_dir=\"/tmp/prof\" --set model.preset=\"125m\" --set model.attention=\"$att\" \
    --set data.seq_len=$s --set data.batch_size=$b --steps 5 --profile 4..5 --nvtx > $L/$P-$n.log 2>&1
  say "$n exit=$?"
  $PY $B/trace_summary.py /tmp/prof/$n/trace-steps-4-5.json $n --top 70 > $L/$P-profile-$n.txt 2>&1
  $PY $B/trace_summary.py /tmp/prof/$n/trace-steps-4-5.json $n --top 60 \
    --kernel 'elementwise|reduce|copy|memcpy|memset|sort|scan|radix|index|gather|scatter|cat|fill' > $L/$P-chains-$n.txt 2>&1
  pack
done
pack
head -30 $L/$P-profile-prof-nsa-8192.txt
