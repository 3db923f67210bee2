#!/bin/bash
# Session 39, call A. Builds from cc8712d: head (round 27's code) and new (the warp-level
# decode tiles prefetch the two tiles after the copied one into L2; the selection prefetches
# its picks' raw rows into L2) and d4 (new with four tiles prefetched). The decode part of the GPU check on new; bench decode
# head/new alternated (64k, 125m generation); ncu of both builds' decode kernels at
# 64k x 1 and x 8; ncu --set full of new's compressed tiles at 64k x 8.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu38; P=A
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( ${LIM:-300} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
cat $OUT/$P-device.txt >> $OUT/$P-summary.txt
timeout 90 $B/nsa-new check --gpu --part decode > $OUT/$P-check-new.log 2>&1; rc=$?; say "check new rc=$rc"
tail -1 $OUT/$P-check-new.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-new.log | head -20 >> $OUT/$P-summary.txt
bench() {  # variant, tag
  [ $(left) -gt 40 ] || { say "skip $1 $2"; return; }
  timeout 50 $B/nsa-$1 bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench new 1
bench head 1
bench d4 1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for vb in new:1 new:8 head:1 head:8 d4:8; do
  v=${vb%:*}; bt=${vb#*:}
  [ -n "$NCU" ] && [ $(left) -gt 90 ] || break
  timeout 30 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 10 \
    $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none \
    > $OUT/$P-ncu-$v-b$bt.txt 2>&1; say "ncu $v b$bt rc=$?"
done
if [ -n "$NCU" ] && [ $(left) -gt 100 ]; then
  timeout 45 $NCU --set full --cache-control none --clock-control none --kernel-name regex:nsa_dec_cmp \
    --launch-skip 1 --launch-count 1 $B/nsa-new bench decode --device cuda --seq 65536 --shape paper \
    --batch 8 --repeats 1 --preset none > $OUT/$P-ncu-full-cmp-b8.txt 2>&1; say "ncu full cmp b8 rc=$?"
fi
bench new 2
bench head 2
if [ -n "$NCU" ] && [ $(left) -gt 60 ]; then  # where the selection's 14 us at batch 1 go
  timeout 40 $NCU --set full --cache-control none --clock-control none --kernel-name regex:nsa_dec_scores \
    --launch-skip 1 --launch-count 1 $B/nsa-new bench decode --device cuda --seq 65536 --shape paper \
    --batch 1 --repeats 1 --preset none > $OUT/$P-ncu-full-scores-b1.txt 2>&1; say "ncu full scores b1 rc=$?"
fi
bench d4 2
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | awk -F'|' '{print $2,$3,$4,"graph",$6,"emit",$7,"attn",$9,"dense",$11,"ratio",$12}'; grep -E "^\| 125m \| nsa" $f | awk -F'|' '{print "gen graph",$9,"split",$11}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-ncu-*-b?.txt; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done >> $OUT/$P-summary.txt
grep -E "Duration|DRAM Throughput|Registers Per|Dynamic Shared|Issue Slots|Warp Cycles Per Issued|Achieved Occupancy|L2 Hit" $OUT/$P-ncu-full-cmp-b8.txt >> $OUT/$P-summary.txt 2>/dev/null
cat $OUT/$P-summary.txt
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-device.txt
