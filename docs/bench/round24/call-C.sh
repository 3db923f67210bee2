# Round 24, call C: the cache writes by scatters (build `scatter`, 5bc949a) against `new`
# (1b28922): decode GPU checks, bench decode alternated, and the launch sequence of a step.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu35
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/C-device.txt
timeout 150 $B/nsa-scatter check --gpu --part decode > $OUT/C-check.log 2>&1
echo "check rc=$?" >> $OUT/C-summary.txt
grep "FAIL\|checks passed\|checks failed" $OUT/C-check.log >> $OUT/C-summary.txt
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 100 $NCU --metrics gpu__time_duration.sum --print-summary per-kernel \
  $B/nsa-scatter bench decode --device cuda --seq 65536 --shape 125m --batch 1 --repeats 1 --preset none \
  > $OUT/C-ncu-scatter.log 2>&1
echo "ncu rc=$?" >> $OUT/C-summary.txt
for r in 1 2; do for v in scatter new; do
  timeout 120 $B/nsa-$v bench decode --device cuda --seq 8192,65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/C-bench-$v-$r.log 2>&1
  echo "bench $v $r rc=$?" >> $OUT/C-summary.txt
done; done
cd $OUT && tar czf C-logs.tgz C-*.log C-device.txt && cd - > /dev/null
cat $OUT/C-summary.txt
for f in $OUT/C-bench-*-1.log $OUT/C-bench-*-2.log; do echo "== $f"; grep "^| paper\|^| 125m" $f | cut -d'|' -f2-7; done
