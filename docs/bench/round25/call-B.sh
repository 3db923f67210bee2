#!/bin/bash
# Session 36, call B: the decode step's prologue kernel (`new`: RoPE, the cache writes and the
# gates in one launch) against `head` (861bb95): the decode part of the GPU check on new, bench
# decode alternated (layer step graphs at 8k and 64k, 125m generation), the launch sequence of
# one 125m layer step under ncu. Budget-guarded: a step that would pass 540 s is skipped.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu36; P=B
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( 540 - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
timeout 200 $B/nsa-new check --gpu --part decode > $OUT/$P-check.log 2>&1; say "check rc=$?"
grep "FAIL\|checks passed\|checks failed\|fail" $OUT/$P-check.log | head -20 >> $OUT/$P-summary.txt
bench() {  # variant, tag, seqs, preset
  [ $(left) -gt 70 ] || { say "skip $1 $2"; return; }
  timeout $(left) $B/nsa-$1 bench decode --device cuda --seq $3 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset $4 --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench new 1 8192,65536 125m
bench head 1 8192,65536 125m
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ $(left) -gt 150 ]; then
  timeout 90 $NCU --metrics gpu__time_duration.sum --print-summary per-kernel \
    $B/nsa-new bench decode --device cuda --seq 65536 --shape 125m --batch 1 --repeats 1 --preset none \
    > $OUT/$P-ncu-new.log 2>&1; say "ncu rc=$?"
  grep '==PROF== Profiling' $OUT/$P-ncu-new.log | sed 's/.*Profiling "\([^"]*\)".*/\1/' | head -120 > $OUT/$P-ncu-new-sequence.txt
fi
bench new 2 8192,65536 125m
bench head 2 8192,65536 125m
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && cd - > /dev/null
cat $OUT/$P-summary.txt
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep "^| paper\|^| 125m" $f | cut -d'|' -f2-7; done
