#!/bin/bash
# Session 40, call E (round 29): per-instruction profiles (SASS, CSV) of the final build's
# compressed tiles and selection at 64k x 8: warp stall samples and excessive sectors.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu40; P=E
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for k in cmp scores; do
  timeout 60 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec_$k --launch-skip 2 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --import-source no --page source --print-source sass --csv \
    $B/nsa-final bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none \
    > $OUT/$P-src-$k-b8.csv 2> $OUT/$P-src-$k-b8.err; echo "ncu $k rc=$? $(wc -l < $OUT/$P-src-$k-b8.csv) lines"
  head -3 $OUT/$P-src-$k-b8.csv | cut -c1-600
done
cd $OUT && tar czf $P-logs.tgz $P-* && rm -f $P-*.csv $P-*.err
