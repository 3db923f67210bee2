#!/bin/bash
# Session 44, call C (round 33, H200, run inline): reproducible GPU training with the landed
# kernels (the window's backward deterministic by construction since round 32).
B=.gpu43; P=C; LIM=230; source docs/bench/call-lib.sh
timeout 220 $B/nsa-main check --determinism --presets tiny,small --steps 60 --resume-at 30 > $OUT/C-determinism.log 2>&1
say "determinism rc=$?"; tail -25 $OUT/C-determinism.log >> $OUT/C-summary.txt
summarize
