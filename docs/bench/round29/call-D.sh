#!/bin/bash
# Session 40, call D (round 29): final = main fe9784e + warp_copy_rows16 (the warp tiles' copy
# loops in one helper; same resources, SASS differs in operand order). Decode check + bench on
# final; ncu of the compressed tiles at 64k x 8 with warp-state and source counters (where
# their warps stall), and of the selection at 64k x 8.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu40; P=D
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
cat $OUT/$P-device.txt >> $OUT/$P-summary.txt
timeout 90 $B/nsa-final check --gpu --part decode > $OUT/$P-check-final.log 2>&1; say "check final rc=$?"
tail -1 $OUT/$P-check-final.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-final.log | cut -c1-200 | head -10 >> $OUT/$P-summary.txt
timeout 45 $B/nsa-final bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
  --repeats 10 --preset none > $OUT/$P-bench-final.log 2>&1; say "bench final rc=$?"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout 60 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec_cmp --launch-skip 2 --launch-count 1 \
    --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis --section SpeedOfLight \
    $B/nsa-final bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none \
    > $OUT/$P-ncu-cmp-b8.txt 2>&1; say "ncu cmp b8 rc=$?"
  timeout 60 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec_scores --launch-skip 2 --launch-count 1 \
    --set full $B/nsa-final bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none \
    > $OUT/$P-ncu-scores-b8.txt 2>&1; say "ncu scores b8 rc=$?"
fi
grep -E "^\| (paper|125m) \| [0-9]" $OUT/$P-bench-final.log | sort -u | awk -F'|' '{print $2,$3,$4,"graph",$6,"attn",$9,"dense",$11,"ratio",$12}' >> $OUT/$P-summary.txt
grep -iE "stall|Duration|DRAM Throughput|Warp Cycles|Issued Warp|Eligible|Active Warps" $OUT/$P-ncu-cmp-b8.txt | head -40 >> $OUT/$P-summary.txt
grep -iE "Duration|Warp Cycles|Eligible|Barrier|Issued Ipc" $OUT/$P-ncu-scores-b8.txt | head -12 >> $OUT/$P-summary.txt
cat $OUT/$P-summary.txt
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-device.txt
