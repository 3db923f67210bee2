#!/bin/bash
# Session 39, call B. Builds from cc8712d: head (round 27's code) and sel (the decode
# selection: a slice's short last chunk sums only the elements its blocks read, the warps'
# lists merged only among warps that had blocks, the last CTA's loads of the slices' lists all
# issued before its first merge; decode-selection-handoff.diff) and mix (the warp-level tiles'
# K by bulk copies and V by cp.async on sm_90; decode-tiles-mixed-copies.diff). The decode
# part of the GPU check on sel and mix; bench decode sel/mix/head alternated (64k, 125m
# generation); ncu of the builds' decode kernels at 64k x 1, x 8; the launch sweep of the
# selection's slices on sel and head.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu39; P=B
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( ${LIM:-300} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
cat $OUT/$P-device.txt >> $OUT/$P-summary.txt
timeout 90 $B/nsa-sel check --gpu --part decode > $OUT/$P-check-sel.log 2>&1; rc=$?; say "check sel rc=$rc"
tail -1 $OUT/$P-check-sel.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-sel.log | cut -c1-200 | head -20 >> $OUT/$P-summary.txt
timeout 90 $B/nsa-mix check --gpu --part decode > $OUT/$P-check-mix.log 2>&1; rc=$?; say "check mix rc=$rc"
tail -1 $OUT/$P-check-mix.log >> $OUT/$P-summary.txt
bench() {  # variant, tag
  [ $(left) -gt 30 ] || { say "skip $1 $2"; return; }
  timeout 45 $B/nsa-$1 bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
sweep() {  # variant
  [ $(left) -gt 40 ] || { say "skip sweep $1"; return; }
  timeout 40 $B/nsa-$1 bench decode-launch --device cuda --seq 65536 --batch 1,8 --tile-ctas 264 \
    --select-slices 4,8,16 --programmatic on --repeats 10 > $OUT/$P-sweep-$1.log 2>&1
  say "sweep $1 rc=$?"
}
bench sel 1
bench mix 1
bench head 1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for vb in sel:1 head:1 sel:8 head:8 mix:8; do
  v=${vb%:*}; bt=${vb#*:}
  [ -n "$NCU" ] && [ $(left) -gt 25 ] || break
  timeout 30 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 10 \
    $B/nsa-$v bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none \
    > $OUT/$P-ncu-$v-b$bt.txt 2>&1; say "ncu $v b$bt rc=$?"
done
sweep sel
sweep head
bench sel 2
bench mix 2
bench head 2
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | awk -F'|' '{print $2,$3,$4,"graph",$6,"emit",$7,"attn",$9,"dense",$11,"ratio",$12}'; grep -E "^\| 125m \| nsa" $f | awk -F'|' '{print "gen graph",$9,"split",$11}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-ncu-*-b?.txt; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-sweep-*.log; do echo "== $f"; grep -E "^\|" $f | cut -c1-160; done >> $OUT/$P-summary.txt
cat $OUT/$P-summary.txt
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-device.txt
