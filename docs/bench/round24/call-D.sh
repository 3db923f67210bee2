# Round 24, call D: the final build (`sampler`, HEAD of the round): every GPU check, then the
# decode sweep over every cached length (paper and 125m, batch 1 and 8), a table last.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu35
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/D-summary.txt; }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/D-device.txt
cat $B/variants.txt >> $OUT/D-device.txt
timeout 280 $B/nsa-sampler check --gpu > $OUT/D-check.log 2>&1; say "check rc=$?"
grep "FAIL\|checks passed\|checks failed" $OUT/D-check.log >> $OUT/D-summary.txt
timeout 250 $B/nsa-sampler bench decode --device cuda --shape paper,125m --batch 1,8 --repeats 10 \
  --preset none > $OUT/D-sweep.log 2>&1; say "sweep rc=$?"
cd $OUT && tar czf D-logs.tgz D-*.log D-device.txt && cd - > /dev/null
cat $OUT/D-summary.txt
grep "^| paper\|^| 125m" $OUT/D-sweep.log | cut -d'|' -f2-12
