#!/bin/bash
# Session 37, call A. Builds: head (e3d53f0) and new (the compressed decode kernel a
# programmatic dependent of the step's prologue). Every GPU check on new (its kernels are
# head's but decode.cu's launch instructions), the decode part on head (decode.cu changed at
# 825973e, not yet run on a GPU); bench decode alternated (64k, 125m generation with the token
# split); per-kernel times of new's decode step under ncu at 64k x 1 and x 8 (H200 breakdown).
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu37; P=A
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/$P-summary.txt; }
left() { echo $(( 560 - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
chmod +x $B/nsa-*
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/$P-device.txt
timeout 240 $B/nsa-new check --gpu > $OUT/$P-check-new.log 2>&1; say "check new rc=$?"
tail -1 $OUT/$P-check-new.log >> $OUT/$P-summary.txt
grep -iE "\| fail" $OUT/$P-check-new.log | head -20 >> $OUT/$P-summary.txt
bench() {  # variant, tag
  [ $(left) -gt 75 ] || { say "skip $1 $2"; return; }
  timeout 90 $B/nsa-$1 bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/$P-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench new 1
bench head 1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for bt in 1 8; do
  [ -n "$NCU" ] && [ $(left) -gt 120 ] || break
  timeout 50 $NCU --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 10 \
    $B/nsa-new bench decode --device cuda --seq 65536 --shape paper --batch $bt --repeats 1 --preset none \
    > $OUT/$P-ncu-new-b$bt.log 2>&1; say "ncu b$bt rc=$?"
done
bench new 2
bench head 2
[ $(left) -gt 60 ] && { timeout 55 $B/nsa-head check --gpu --part decode > $OUT/$P-check-head-decode.log 2>&1; say "check head decode rc=$?"; tail -1 $OUT/$P-check-head-decode.log >> $OUT/$P-summary.txt; }
cat $OUT/$P-summary.txt
for f in $OUT/$P-bench-*.log; do echo "== $f"; grep -E "^\| (paper|125m) \| [0-9]" $f | sort -u | cut -d'|' -f2-4,6,9,11,12; grep -E "^\| 125m \| (nsa|dense)" $f | sort -u; grep -i "host ms" $f | head -3; done
for f in $OUT/$P-ncu-*.log; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done
