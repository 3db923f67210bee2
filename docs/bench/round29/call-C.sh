#!/bin/bash
# Session 40, call C (round 29), run with LIM=330. combo = main 9de6494 + decode-selection-handoff.diff +
# decode-tiles-mixed-copies.diff + the selection's slices of at most 64 blocks (grid.rs);
# head = main. Decode check on combo; bench decode alternated; launch sweep; ncu; the full
# cache-length table on combo.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu40; P=C
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( ${LIM:-300} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
tar xzf $B/bins.tgz -C $B && chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
cat $OUT/$P-device.txt >> $OUT/$P-summary.txt
timeout 90 $B/nsa-combo check --gpu --part decode > $OUT/$P-check-combo.log 2>&1; rc=$?; say "check combo rc=$rc"
tail -1 $OUT/$P-check-combo.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-combo.log | cut -c1-200 | head -10 >> $OUT/$P-summary.txt
bench() {  # variant, tag
  [ $(left) -gt 30 ] || { say "skip $1 $2"; return; }
  timeout 45 $B/nsa-$1 bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench combo 1
bench head 1
[ $(left) -gt 40 ] && { timeout 60 $B/nsa-combo bench decode-launch --device cuda --seq 65536,131072 --batch 1,8,32 --shape paper,125m --tile-ctas 264 --programmatic on \
    --select-slices 4,16,32,64 --repeats 10 > $OUT/$P-sweep-combo.log 2>&1; say "sweep combo rc=$?"; }
bench combo 2
bench head 2
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for vb in combo:1 combo:8; do
  v=${vb%:*}; bt=${vb#*:}
  [ -n "$NCU" ] && [ $(left) -gt 25 ] || break
  timeout 30 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 10 \
    $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none \
    > $OUT/$P-ncu-$v-b$bt.txt 2>&1; say "ncu $v b$bt rc=$?"
done
[ $(left) -gt 70 ] && { timeout 90 $B/nsa-combo bench decode --device cuda --seq 8192,16384,32768,65536,131072 --shape paper \
    --batch 1,8 --repeats 10 --preset none > $OUT/$P-full-combo.log 2>&1; say "full combo rc=$?"; }
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | awk -F'|' '{print $2,$3,$4,"graph",$6,"emit",$7,"attn",$9,"dense",$11,"ratio",$12}'; grep -E "^\| 125m \| nsa" $f | awk -F'|' '{print "gen graph",$9,"split",$11}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-ncu-*-b?.txt; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-sweep-*.log $OUT/$P-full-*.log; do echo "== $f"; grep -E "^\|" $f | cut -c1-170; done >> $OUT/$P-summary.txt
cat $OUT/$P-summary.txt
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-device.txt
