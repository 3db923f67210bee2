#!/bin/bash
# Session 43, call B (round 32): racecheck over the landed backward kernels (harness, small
# cases), and the experimental variants of x_window_bwd.cu timed against each other.
B=.gpu43; P=B; LIM=200
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
timeout 60 $PY docs/bench/round32/wb_harness.py $B/wb.cubin xbench $B/xb.cubin > "$OUT/$P-xbench.log" 2>&1
say "xbench rc=$?"; cat "$OUT/$P-xbench.log" >> "$OUT/$P-summary.txt"
timeout 100 compute-sanitizer --tool racecheck $PY docs/bench/round32/wb_harness.py $B/wb.cubin small > "$OUT/$P-racecheck.log" 2>&1
say "racecheck rc=$?"; grep -E "ran|RACECHECK SUMMARY|ERROR SUMMARY|hazard" "$OUT/$P-racecheck.log" | tail -14 >> "$OUT/$P-summary.txt"
summarize
