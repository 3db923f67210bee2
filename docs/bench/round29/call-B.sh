#!/bin/bash
# Session 40, call B (round 29). Builds from main 9de6494 (tar bins.tgz): head (main), sel
# (../round28/decode-selection-handoff.diff), mix (../round28/decode-tiles-mixed-copies.diff),
# sw16 (select-g16-syncwarp.diff: the training selection kernel at G = 16, the barrier after a
# tile's head sums becomes __syncwarp, each warp folding the token whose heads it summed),
# selw (select-fold-head-sum.diff: sw16 plus, for other G, Eq. 10 summed where the fold reads
# it instead of in a pass between two barriers). Decode: check + bench + ncu + launch sweep as
# round 28's call-B. Training selection: scripts/select_harness (staged by prepare.py into
# $B/sel; run.sh there compiled in the background with COMPILE_ONLY=1, shapes without
# "1 131072 16 192 8") on main/sw16/selw, check --part compressed on sw16 and selw, bench attn.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu40; P=B
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( ${LIM:-500} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
tar xzf $B/bins.tgz -C $B && chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
cat $OUT/$P-device.txt >> $OUT/$P-summary.txt
# The selection harness compiles (nvcc) in the background while the decode checks run.
export PATH=$PATH:/usr/local/cuda/bin
( cd $B/sel && COMPILE_ONLY=1 bash run.sh . main:3 sw16:3 selw:3 > $OUT/$P-harness-nvcc.log 2>&1 ) &
HP=$!
for v in sel mix; do
  timeout 90 $B/nsa-$v check --gpu --part decode > $OUT/$P-check-$v.log 2>&1; rc=$?; say "check $v rc=$rc"
  tail -1 $OUT/$P-check-$v.log >> $OUT/$P-summary.txt
  grep -iE "\| fail" $OUT/$P-check-$v.log | cut -c1-200 | head -10 >> $OUT/$P-summary.txt
done
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
wait $HP; say "harness compiled"
( cd $B/sel && timeout 150 bash run.sh . main:3 sw16:3 selw:3 > $OUT/$P-harness.log 2>&1 ); say "harness rc=$?"
bench sel 1
bench mix 1
bench head 1
for v in sw16 selw; do
  [ $(left) -gt 60 ] || { say "skip check $v"; continue; }
  timeout 120 $B/nsa-$v check --gpu --part compressed > $OUT/$P-check-$v.log 2>&1; rc=$?; say "check compressed $v rc=$rc"
  tail -1 $OUT/$P-check-$v.log >> $OUT/$P-summary.txt
  grep -iE "\| fail" $OUT/$P-check-$v.log | cut -c1-200 | head -10 >> $OUT/$P-summary.txt
done
bench sel 2
bench mix 2
bench head 2
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
for v in sw16 head; do
  [ $(left) -gt 50 ] || { say "skip attn $v"; continue; }
  timeout 60 $B/nsa-$v bench attn --path fused --seq 65536 --repeats 3 > $OUT/$P-attn-$v.log 2>&1; say "attn $v rc=$?"
done
grep -E "median|equal|DIFFER|REG" $OUT/$P-harness.log >> $OUT/$P-summary.txt
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | awk -F'|' '{print $2,$3,$4,"graph",$6,"emit",$7,"attn",$9,"dense",$11,"ratio",$12}'; grep -E "^\| 125m \| nsa" $f | awk -F'|' '{print "gen graph",$9,"split",$11}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-ncu-*-b?.txt; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done >> $OUT/$P-summary.txt
for f in $OUT/$P-sweep-*.log; do echo "== $f"; grep -E "^\|" $f | cut -c1-160; done >> $OUT/$P-summary.txt
for f in $OUT/$P-attn-*.log; do echo "== $f"; grep -E "^\|" $f | cut -c1-200; done >> $OUT/$P-summary.txt
cat $OUT/$P-summary.txt
cd $OUT && tar czf $P-logs.tgz $P-*.log $P-*.txt && rm -f $P-*.log $P-ncu-*.txt $P-device.txt
