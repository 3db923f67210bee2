#!/bin/bash
# Session 32, call F (for the next round): where the decode step's time goes at 0486e6d.
# ncu of the four kernels at 64k x 1 and 16k x 1 and x 8 (paper shape), and ncu --set full with
# source counters of the compressed tile kernel at 64k x 8.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-F}; L=/tmp/r32/logs; mkdir -p $L; B=$PWD/.gpu32; chmod +x $B/nsa-*
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf $B/kcache.tgz -C $K
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
for c in "65536 1" "16384 1" "16384 8"; do set -- $c
  timeout 40 ncu --cache-control none --clock-control none --kernel-name regex:nsa_dec --launch-count 8 $B/nsa-waves bench decode --device cuda --seq $1 --shape paper --batch $2 --repeats 1 --preset none > $L/$P-ncu-$1-b$2.log 2>&1; say "ncu $1 $2 exit=$?"
done; pack
timeout 60 ncu --set full --import-source yes --cache-control none --clock-control none --kernel-name regex:nsa_dec_cmp --launch-skip 2 --launch-count 1 -o $L/$P-cmp $B/nsa-waves bench decode --device cuda --seq 65536 --shape paper --batch 8 --repeats 1 --preset none > $L/$P-ncu-cmp.log 2>&1; say "ncu full exit=$?"
ncu -i $L/$P-cmp.ncu-rep --page details > $L/$P-cmp-details.txt 2>&1
ncu -i $L/$P-cmp.ncu-rep --page source --csv --print-source sass > $L/$P-cmp-sass.csv 2>&1
rm -f $L/$P-cmp.ncu-rep; pack
for f in $L/$P-ncu-*-b*.log; do echo "== $f"; grep -E "^  nsa_dec|Duration" $f | paste - - | awk '{print $1, $(NF)}'; done
grep -E "Duration|DRAM Throughput|Executed Ipc Active|Warp Cycles Per Issued" $L/$P-cmp-details.txt
