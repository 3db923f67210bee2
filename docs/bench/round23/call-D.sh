#!/bin/bash
# Session 34, call D. .gpu35/nsa-main: main after merging `all` (round 23's calls A-C) plus the
# rule of one selection CTA per group up to 256 selection blocks; the kernels are A's `all`
# (same sources: the kernel cache from .gpu34 is reused).
# The decode checks, the decode sweep over every cached length, and the launch sweep at
# 8k-32k for the new rule against the slices.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch; export LD_LIBRARY_PATH=$T/lib
P=D; B=$PWD/.gpu35; L=/tmp/r35/logs; mkdir -p $L ~/.cache/nsa/kernels
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $L/$P-device.txt
tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels; chmod +x $B/nsa-main
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
timeout 120 $B/nsa-main check --gpu --part decode > $L/$P-check.log 2>&1; say "check rc=$?"; tail -1 $L/$P-check.log
grep -hiE "\| fail" $L/$P-check.log | head; pack
timeout 170 $B/nsa-main bench decode --device cuda --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-sweep.log 2>&1; say "sweep rc=$?"; pack
timeout 120 $B/nsa-main bench decode-launch --device cuda --seq 8192,16384,32768 --batch 1,8 --tile-ctas 264 --select-slices 1,4,8 --programmatic off --repeats 10 > $L/$P-launch.log 2>&1; say "launch rc=$?"; pack
grep -E "^\| (paper|125m) \|" $L/$P-sweep.log | awk -F'|' '{print $2,$3,$4,"graph",$8,"dense",$10,$11}' | sort -u
grep -E "^\| paper" $L/$P-launch.log | awk -F'|' '{print $3,$4,$5,$8,$10,$12}'
