#!/bin/bash
# Session 31, call C: where nsa_dec_scores (the decode step's selection, one CTA of 1024 threads
# per (b, g)) spends its ~20 us at 64k, batch 8: ncu's full set with per-SASS-instruction stall
# samples, and the kernel's SASS.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-C}; X=$PWD/.gpu31b/nsa-train; L=/tmp/r31/logs; mkdir -p $L; chmod +x $X
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf .gpu31b/kcache.tgz -C $K
ls -la $K > $L/$P-kcache.txt
D=$(grep -l nsa_dec_scores $K/* | head -1); echo "decode cubin: $D"
cuobjdump --dump-sass $D > $L/$P-decode.sass 2>&1 || nvdisasm -c $D > $L/$P-decode.sass 2>&1
awk '/Function : /{f = /Function : nsa_dec_scores$/} f' $L/$P-decode.sass > $L/$P-scores.sass
say "sass $(wc -l < $L/$P-scores.sass) lines"
timeout 200 ncu --set full --import-source no -k regex:nsa_dec_scores --launch-skip 40 --launch-count 1 -o $L/$P-scores \
  $X bench decode --device cuda --seq 65536 --batch 8 --repeats 3 --preset none > $L/$P-ncu.log 2>&1; say "ncu exit=$?"
ncu -i $L/$P-scores.ncu-rep --page source --csv --print-source sass > $L/$P-scores-source.csv 2>&1; say "source exit=$?"
ncu -i $L/$P-scores.ncu-rep --page details > $L/$P-scores-details.txt 2>&1
rm -f $L/$P-scores.ncu-rep.bak
grep -E "Duration|Executed Ipc|Issue Slots Busy|Warp Cycles Per Issued|Stall|Executed Instructions " $L/$P-scores-details.txt | head -30
wc -l $L/$P-scores-source.csv
tar czf $OUT/$P-logs.tgz -C $L .
