#!/bin/bash
# Session 37, call B (never ran: no device machine could be started). Builds: head (e3d53f0) and
# new (prologue-gates-by-warps.diff applied: the decode prologue's gates one warp per output
# instead of one thread walking the 64 hidden units; and b3c4a4d's greedy pick in one pass
# without listing the vocabulary's ids). To run it later: build head at main and new at main
# with the diff applied, both into .gpu37/ with a kernel cache of both (README of round 25). The decode part of the GPU check on new; bench decode
# alternated (64k, 125m generation with the token split); ncu of new's decode kernels at 64k x 1
# and x 8; an nsys trace of new's generation (where a token's 1.1 ms on the GPU goes).
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu37; P=B
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( ${LIM:-540} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
timeout 90 $B/nsa-new check --gpu --part decode > $OUT/$P-check-new.log 2>&1; say "check new rc=$?"
tail -1 $OUT/$P-check-new.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-new.log | head -20 >> $OUT/$P-summary.txt
bench() {  # variant, tag
  [ $(left) -gt 35 ] || { say "skip $1 $2"; return; }
  timeout 45 $B/nsa-$1 bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench new 1
bench head 1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for bt in 1 8; do
  [ -n "$NCU" ] && [ $(left) -gt 120 ] || break
  timeout 50 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 10 \
    $B/nsa-new bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none \
    > $OUT/$P-ncu-new-b$bt.txt 2>&1; say "ncu b$bt rc=$?"
done
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ] && [ $(left) -gt 90 ]; then
  timeout 60 $NSYS profile -o /tmp/gen --force-overwrite true --cuda-graph-trace=node --trace=cuda \
    $B/nsa-new bench decode --device cuda --seq 8192 --shape 125m --batch 1 --repeats 1 --preset 125m \
    --prompt 32768 --new-tokens 32 --generation-runs 1 > $OUT/$P-nsys-run.txt 2>&1; say "nsys rc=$?"
  timeout 30 $NSYS stats -q -r cuda_gpu_trace -f csv -o /tmp/gen /tmp/gen.nsys-rep > /dev/null 2>&1; say "nsys stats rc=$?"
  ls /tmp/gen* >> $OUT/$P-summary.txt
  for f in /tmp/gen_cuda_gpu_trace*.csv; do gzip -c "$f" > $OUT/$P-gen-trace.csv.gz; done
else
  say "no nsys ($NSYS)"
fi
bench new 2
bench head 2
cat $OUT/$P-summary.txt
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | cut -d'|' -f2-4,6,9,11,12; grep -E "^\| 125m \| (nsa|dense)" $f | sort -u; done
for f in $OUT/$P-ncu-*.txt; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-nsys-run.txt $P-device.txt
