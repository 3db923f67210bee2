# Round 24, call A: the decode step's launches outside attention. GPU checks of the new build
# (decode, pointwise), then `bench decode` for main and new alternated, a table last.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu35
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/A-device.txt
cat $B/variants.txt >> $OUT/A-device.txt 2>/dev/null
timeout 200 $B/nsa-new check --gpu --part decode,pointwise > $OUT/A-check.log 2>&1
echo "check rc=$?" >> $OUT/A-summary.txt
grep -c "| pass |" $OUT/A-check.log >> $OUT/A-summary.txt
grep "FAIL\|checks passed\|checks failed" $OUT/A-check.log >> $OUT/A-summary.txt
for v in main new; do
  timeout 170 $B/nsa-$v bench decode --device cuda --seq 8192,65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/A-bench-$v.log 2>&1
  echo "bench $v rc=$?" >> $OUT/A-summary.txt
done
cd $OUT && tar czf A-logs.tgz A-*.log A-device.txt && cd - > /dev/null
cat $OUT/A-summary.txt
for v in main new; do echo "== $v"; grep "^| paper\|^| 125m" $OUT/A-bench-$v.log | cut -c1-200; done
