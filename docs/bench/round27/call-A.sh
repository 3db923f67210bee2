#!/bin/bash
# Session 38, call A. Builds (all from 1aaa08f): head; new = the decode prologue's gates by
# warps (docs/bench/round26/prologue-gates-by-warps.diff); ref = new plus a fixed-layout plan's
# refill by gathers of precomputed RoPE rows (host launches per generated token). The decode
# part of the GPU check on ref (and on new if ref fails); bench decode head/new/ref alternated
# (64k, 125m generation with the token split); ncu of ref's decode kernels at 64k x 1 and x 8;
# an nsys trace of ref's generation (where a token's GPU time goes).
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu37; P=A
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( ${LIM:-540} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
cat $OUT/$P-device.txt >> $OUT/$P-summary.txt
timeout 90 $B/nsa-ref check --gpu --part decode > $OUT/$P-check-ref.log 2>&1; rc=$?; say "check ref rc=$rc"
tail -1 $OUT/$P-check-ref.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-ref.log | head -20 >> $OUT/$P-summary.txt
if [ $rc -ne 0 ]; then
  timeout 90 $B/nsa-new check --gpu --part decode > $OUT/$P-check-new.log 2>&1; say "check new rc=$?"
  tail -1 $OUT/$P-check-new.log >> $OUT/$P-summary.txt
fi
bench() {  # variant, tag
  [ $(left) -gt 40 ] || { say "skip $1 $2"; return; }
  timeout 50 $B/nsa-$1 bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench ref 1
bench head 1
bench new 1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for bt in 1 8; do
  [ -n "$NCU" ] && [ $(left) -gt 150 ] || break
  timeout 50 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 10 \
    $B/nsa-ref bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none \
    > $OUT/$P-ncu-ref-b$bt.txt 2>&1; say "ncu b$bt rc=$?"
done
if [ -n "$NCU" ] && [ $(left) -gt 170 ]; then  # why the compressed tiles reach 72 % of DRAM at batch 8
  timeout 60 $NCU --set full --cache-control none --clock-control none --kernel-name regex:nsa_dec_cmp \
    --launch-skip 1 --launch-count 1 $B/nsa-ref bench decode --device cuda --seq 65536 --shape paper \
    --batch 8 --repeats 1 --preset none > $OUT/$P-ncu-full-cmp-b8.txt 2>&1; say "ncu full cmp b8 rc=$?"
fi
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ] && [ $(left) -gt 130 ]; then
  timeout 60 $NSYS profile -o /tmp/gen --force-overwrite true --cuda-graph-trace=node --trace=cuda \
    $B/nsa-ref bench decode --device cuda --seq 8192 --shape 125m --batch 1 --repeats 1 --preset 125m \
    --prompt 32768 --new-tokens 32 --generation-runs 1 > $OUT/$P-nsys-run.txt 2>&1; say "nsys rc=$?"
  timeout 30 $NSYS stats -q -r cuda_gpu_trace,cuda_api_trace -f csv -o /tmp/gen /tmp/gen.nsys-rep > /dev/null 2>&1; say "nsys stats rc=$?"
  ls /tmp/gen* >> $OUT/$P-summary.txt
  for f in /tmp/gen_*.csv; do gzip -c "$f" > $OUT/$P-$(basename $f .csv).csv.gz; done
else
  say "no nsys ($NSYS)"
fi
bench ref 2
bench head 2
bench new 2
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | cut -d'|' -f2-4,6,9,11,12; grep -E "^\| 125m \| (nsa|dense)" $f | sort -u; done >> $OUT/$P-summary.txt
for f in $OUT/$P-ncu-ref-*.txt; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done >> $OUT/$P-summary.txt
cat $OUT/$P-summary.txt
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-nsys-run.txt $P-device.txt
