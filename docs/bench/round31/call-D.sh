#!/bin/bash
# Session 42, call D (round 31, run as one command line): compute-sanitizer memcheck and
# racecheck over the window part of the GPU check on call C's build.
B=.gpu42; P=D; LIM=200; source docs/bench/call-lib.sh
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -1)
timeout 90 $CS --tool memcheck $B/nsa-main check --gpu --part window > $OUT/D-memcheck.log 2>&1
say "memcheck rc=$?"; tail -3 $OUT/D-memcheck.log >> $OUT/D-summary.txt
timeout 90 $CS --tool racecheck $B/nsa-main check --gpu --part window > $OUT/D-racecheck.log 2>&1
say "racecheck rc=$?"; tail -3 $OUT/D-racecheck.log >> $OUT/D-summary.txt
cat $OUT/D-summary.txt
