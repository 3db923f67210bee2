#!/bin/bash
# Session 46, call J (round 35; refused: too little device time left to start a machine): call I
# cut to what fits a session's last device minutes:
# nsa-ud's GPU check (window, layer, sync), then the window branch at the paper shape, 64k, for
# main, ud, unp and dq3 (the builds of call-I.sh), then main's check if time is left.
B=${B:-.gpu49}; P=J; LIM=${LIM:-140}
source docs/bench/call-lib.sh
step check-ud 50 $B/nsa-ud check --gpu --part window,layer,sync
tail -1 "$OUT/$P-check-ud.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check-ud.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
for v in main ud unp dq3; do
  step br-$v 15 $B/nsa-$v bench branches --branch window --shape paper --seq 65536 --repeats 5
  grep -hE "^\| paper" "$OUT/$P-br-$v.log" | grep "fused |" | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
step check-main 40 $B/nsa-main check --gpu --part window
tail -1 "$OUT/$P-check-main.log" >> "$OUT/$P-summary.txt"
summarize
