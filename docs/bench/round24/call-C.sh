# Round 24, call C: `sampler` (8b4b2c1: the cache writes by scatters, 5bc949a, and greedy picks
# without sorting the vocabulary) against `new` (1b28922) and `main` (a8fa71d): decode GPU
# checks, the launch sequence of a step (ncu), bench decode alternated twice.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu35
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/C-device.txt
cat $B/variants.txt >> $OUT/C-device.txt
timeout 150 $B/nsa-sampler check --gpu --part decode > $OUT/C-check.log 2>&1
echo "check rc=$?" >> $OUT/C-summary.txt
grep "FAIL\|checks passed\|checks failed" $OUT/C-check.log >> $OUT/C-summary.txt
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 100 $NCU --metrics gpu__time_duration.sum --print-summary per-kernel \
  $B/nsa-sampler bench decode --device cuda --seq 65536 --shape 125m --batch 1 --repeats 1 --preset none \
  > $OUT/C-ncu-sampler.log 2>&1
echo "ncu rc=$?" >> $OUT/C-summary.txt
for r in 1 2; do for v in sampler new main; do
  timeout 100 $B/nsa-$v bench decode --device cuda --seq 8192,65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/C-bench-$v-$r.log 2>&1
  echo "bench $v $r rc=$?" >> $OUT/C-summary.txt
done; done
# The launch sequence of a whole 125m decode step (generation after a 1k prompt, 3 tokens).
timeout 120 $NCU --metrics gpu__time_duration.sum \
  $B/nsa-sampler bench decode --device cuda --seq 64 --shape 125m --batch 1 --repeats 1 --preset 125m \
  --prompt 1024 --new-tokens 3 --generation-runs 1 > $OUT/C-ncu-generation.log 2>&1
echo "ncu generation rc=$?" >> $OUT/C-summary.txt
cd $OUT && tar czf C-logs.tgz C-*.log C-device.txt && cd - > /dev/null
cat $OUT/C-summary.txt
for f in $OUT/C-bench-*.log; do echo "== $f"; grep "^| paper\|^| 125m" $f | cut -d'|' -f2-9; done
