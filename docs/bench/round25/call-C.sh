#!/bin/bash
# Session 36, call C: `pdl` (the compressed decode kernel as a programmatic dependent of the
# step's prologue, and bench decode's split of a generated token) against `new` (f8c7806): the
# decode part of the GPU check on pdl, bench decode alternated, the launch sequence of one
# 125m layer step under ncu. Budget-guarded: a step that would pass 540 s is skipped.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu36; P=C
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( 540 - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
timeout 200 $B/nsa-pdl check --gpu --part decode > $OUT/$P-check.log 2>&1; say "check rc=$?"
grep "checks passed\|checks failed\|| fail" $OUT/$P-check.log | head -20 >> $OUT/$P-summary.txt
bench() {  # variant, tag
  [ $(left) -gt 70 ] || { say "skip $1 $2"; return; }
  timeout $(left) $B/nsa-$1 bench decode --device cuda --seq 8192,65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench pdl 1
bench new 1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ $(left) -gt 150 ]; then
  timeout 100 $NCU --metrics gpu__time_duration.sum \
    $B/nsa-pdl bench decode --device cuda --seq 65536 --shape 125m --batch 1 --repeats 1 --preset none \
    > /tmp/ncu-pdl.log 2>&1; say "ncu rc=$?"
  grep '==PROF== Profiling' /tmp/ncu-pdl.log | sed 's/.*Profiling "\([^"]*\)".*/\1/' > $OUT/$P-ncu-pdl-sequence.txt
  grep -E '^\s+[a-z_0-9]+.*\(|gpu__time_duration' /tmp/ncu-pdl.log | tail -400 > $OUT/$P-ncu-pdl-tail.txt
fi
bench pdl 2
bench new 2
cat $OUT/$P-summary.txt
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep "^| paper\|^| 125m" $f | grep -v '| nsa |\|| dense |' | head -8 | cut -d'|' -f2-7; grep '| nsa |\|| dense |' $f | sort -u; done
