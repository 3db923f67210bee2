# Round 24, call B: every kernel of one layer step (new build), 125m and paper at 64k, batch 1,
# by ncu's per-kernel summary (graph replays profiled node by node), then a second bench run
# of each build (alternated, in reverse order).
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu35
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for v in new main; do
  timeout 150 $NCU --metrics gpu__time_duration.sum --print-summary per-kernel \
    $B/nsa-$v bench decode --device cuda --seq 65536 --shape 125m --batch 1 --repeats 1 --preset none \
    > $OUT/B-ncu-$v.log 2>&1
  echo "ncu $v rc=$?" >> $OUT/B-summary.txt
done
for v in new main; do
  timeout 170 $B/nsa-$v bench decode --device cuda --seq 8192,65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/B-bench-$v.log 2>&1
  echo "bench $v rc=$?" >> $OUT/B-summary.txt
done
cd $OUT && tar czf B-logs.tgz B-*.log && cd - > /dev/null
cat $OUT/B-summary.txt
for v in new main; do echo "== $v"; grep "^| paper\|^| 125m" $OUT/B-bench-$v.log | cut -c1-200; done
