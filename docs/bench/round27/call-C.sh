#!/bin/bash
# Session 38, call C. Builds: e4a (e4a805f, main) and tma (e4a805f plus the compressed decode
# tiles by tensor-map boxes on sm_90: five copies a warp's stage at the paper shape instead of
# 32 row copies, 128-byte swizzled stages). The decode part of the GPU check on tma; bench
# decode e4a/tma alternated at 64k (paper and 125m, batch 1 and 8, 125m generation); ncu of
# tma's decode kernels at 64k x 1 and x 8 and the full set on its compressed tiles at x 8.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu37; P=C
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( ${LIM:-540} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
cat $OUT/$P-device.txt >> $OUT/$P-summary.txt
timeout 90 $B/nsa-tma check --gpu --part decode > $OUT/$P-check-tma.log 2>&1; say "check tma rc=$?"
tail -1 $OUT/$P-check-tma.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-tma.log | cut -c1-200 | head -20 >> $OUT/$P-summary.txt
bench() {  # variant, tag
  [ $(left) -gt 40 ] || { say "skip $1 $2"; return; }
  timeout 50 $B/nsa-$1 bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench tma 1
bench e4a 1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for bt in 1 8; do
  [ -n "$NCU" ] && [ $(left) -gt 150 ] || break
  timeout 50 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 10 \
    $B/nsa-tma bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none \
    > $OUT/$P-ncu-tma-b$bt.txt 2>&1; say "ncu b$bt rc=$?"
done
if [ -n "$NCU" ] && [ $(left) -gt 150 ]; then
  timeout 60 $NCU --set full --cache-control none --clock-control none --kernel-name regex:nsa_dec_cmp \
    --launch-skip 1 --launch-count 1 $B/nsa-tma bench decode --device cuda --seq 65536 --shape paper \
    --batch 8 --repeats 1 --preset none > $OUT/$P-ncu-full-cmp-b8.txt 2>&1; say "ncu full cmp b8 rc=$?"
fi
bench tma 2
bench e4a 2
if [ $(left) -gt 200 ]; then  # the full decode table at 8k-128k on tma
  timeout 150 $B/nsa-tma bench decode --device cuda --seq 8192,16384,32768,65536,131072 --shape paper,125m \
    --batch 1,8 --repeats 10 --preset none > $OUT/$P-bench-tma-table.log 2>&1; say "table rc=$?"
fi
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | awk -F'|' '{print $2,$3,$4,"graph",$6,"emit",$7,"attn",$9,"dense",$11,"ratio",$12}'; grep -E "^\| 125m \| nsa" $f | awk -F'|' '{print "gen graph",$9,"split",$11}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-ncu-tma-*.txt; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done >> $OUT/$P-summary.txt
grep -E "Duration|DRAM Throughput|Registers Per|Dynamic Shared|Issue Slots|Warp Cycles Per Issued|Achieved Occupancy" $OUT/$P-ncu-full-cmp-b8.txt >> $OUT/$P-summary.txt 2>/dev/null
cat $OUT/$P-summary.txt
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-device.txt
