#!/bin/bash
# Session 45, call H (round 34): the committed form of call G's nsa-x4 (the window forward with
# four warpgroups at dk = dv = 128 and dk = 192, dv = 128; machine code identical to x4's,
# compared with cuobjdump): the window, layer and sync parts of the GPU check, racecheck over
# the window part with only the wgmma forward instrumented, the window branch against nsa-old
# (call F's build: the loader, two warpgroups), the layer and training. nsa-x64 (not committed):
# this build with four warpgroups at dk = dv = 64 too (the 125m shape), its window check and
# the 125m window branch beside nsa-main's.
# Then (prepared after call G, not yet run) the dQ kernel with three warpgroups and 32 keys a
# tile (x_window_bwd_dq.cu) against the landed one in wb3_harness.py. prepare-H.sh builds the
# folder from a clean tree; nsa-old is optional (its steps are skipped without it). Last,
# nsa-dq3 (dq-wgs.diff: that dQ kernel in the library at dv = 128): the window and layer
# checks, the branch and training. The builds time `bench branches`' fwd+bwd with the output's
# gradient handed to autograd (no Σ out · grad loss): not comparable with calls F and G there.
B=${B:-.gpu47}; P=H; LIM=${LIM:-420}
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
X=docs/bench/round34/wb3_harness.py
step dq-check 60 $PY $X $B/wb.cubin $B/xdq.cubin check; tail -1 "$OUT/$P-dq-check.log" >> "$OUT/$P-summary.txt"
step dq-bench 60 $PY $X $B/wb.cubin $B/xdq.cubin bench; cat "$OUT/$P-dq-bench.log" >> "$OUT/$P-summary.txt"
step check 40 $B/nsa-main check --gpu --part window,layer,sync; tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
for v in main old; do
  [ -x $B/nsa-$v ] || continue
  step branches-paper-$v 20 $B/nsa-$v bench branches --branch window --shape paper --seq 16384,65536 --repeats 5
  grep -hE "^\| paper" "$OUT/$P"-branches-paper-$v.log | grep "fused |" | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
step check-x64 30 $B/nsa-x64 check --gpu --part window; tail -1 "$OUT/$P-check-x64.log" >> "$OUT/$P-summary.txt"
for v in main x64; do
  step branches-125m-$v 15 $B/nsa-$v bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5
  grep -hE "^\| 125m" "$OUT/$P"-branches-125m-$v.log | grep "fused |" | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
for v in main; do
  step attn-$v 25 $B/nsa-$v bench attn --path fused --seq 65536 --repeats 3; grep -E "^\| 65536" "$OUT/$P-attn-$v.log" | cut -d"|" -f1-6 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
for v in main; do
  step train-$v 40 $B/nsa-$v bench train --device cuda --preset 125m --seq 8192,32768 --steps 4; grep -E "^\|" "$OUT/$P-train-$v.log" | tail -4 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
step check-dq3 40 $B/nsa-dq3 check --gpu --part window,layer; tail -1 "$OUT/$P-check-dq3.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check-dq3.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
step branches-paper-dq3 20 $B/nsa-dq3 bench branches --branch window --shape paper --seq 16384,65536 --repeats 5
grep -hE "^\| paper" "$OUT/$P"-branches-paper-dq3.log | grep "fused |" | sed "s/^/dq3 /" >> "$OUT/$P-summary.txt"
step train-dq3 40 $B/nsa-dq3 bench train --device cuda --preset 125m --seq 8192,32768 --steps 4; grep -E "^\|" "$OUT/$P-train-dq3.log" | tail -4 | sed "s/^/dq3 /" >> "$OUT/$P-summary.txt"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
step racecheck 60 $CS --tool racecheck --kernel-name kns=nsa_window_fwd $B/nsa-main check --gpu --part window
tail -4 "$OUT/$P-racecheck.log" >> "$OUT/$P-summary.txt"
summarize
