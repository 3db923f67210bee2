#!/bin/bash
# Session 46, call I (round 35; never run: twelve starts found no machine): round 34's call H
# reordered by priority, with two new builds. In $B/bins.tgz (prepare-I.sh builds the same
# from main and the diffs here; this session's .gpu48 held them at these commits): nsa-main
# (a9c4e48: the committed kernels, the GPU check's new long window row, `bench attn` without
# its Σ out·g loss), nsa-unp (b3b56ad: no
# zero-padded value columns when the wgmma kernels run both ways), nsa-dq3 (f2177d6 + round
# 34's dq-wgs.diff: the dQ kernel with three warpgroups and 32 keys a tile), nsa-ud (a18e0ec:
# both), nsa-x64 (f2177d6 with four warpgroups in the window forward at dk = dv = 64 too).
# wb3_harness.py checks and times x_window_bwd_dq.cu against the landed dQ ($B/wb.cubin,
# $B/xdq.cubin). The checks of unp and dq3 alone run only if ud's fails. Ordered for a short
# call: the GPU checks, the window branch, the dQ harness, the layer; the rest if time is left.
B=${B:-.gpu49}; P=I; LIM=${LIM:-480}
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
X=docs/bench/round34/wb3_harness.py
chk() {  # variant, parts
  step check-$1 45 $B/nsa-$1 check --gpu --part $2; tail -1 "$OUT/$P-check-$1.log" >> "$OUT/$P-summary.txt"
  grep -iE "\| fail" "$OUT/$P-check-$1.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
}
br() {  # variant, tag, shape args...
  local v=$1 tag=$2; shift 2
  step br-$tag-$v 20 $B/nsa-$v bench branches --branch window "$@" --repeats 5
  grep -hE "^\| (paper|125m)" "$OUT/$P-br-$tag-$v.log" | grep "fused |" | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
}
chk main window,layer,sync
chk ud window,layer,sync
for v in main ud unp dq3; do br $v paper1 --shape paper --seq 16384,65536; done
step dq-bench 45 $PY $X $B/wb.cubin $B/xdq.cubin bench; cat "$OUT/$P-dq-bench.log" >> "$OUT/$P-summary.txt"
for v in main ud; do
  step attn-$v 30 $B/nsa-$v bench attn --path fused --seq 65536 --repeats 3
  grep -E "^\| 65536" "$OUT/$P-attn-$v.log" | cut -d"|" -f1-7 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
if grep -qE "\| fail|FAIL" "$OUT/$P-check-ud.log" 2>/dev/null; then
  chk unp window,layer
  chk dq3 window,layer
fi
for v in main ud; do br $v paper2 --shape paper --seq 65536; done
step dq-check 45 $PY $X $B/wb.cubin $B/xdq.cubin check; tail -1 "$OUT/$P-dq-check.log" >> "$OUT/$P-summary.txt"
chk x64 window
for v in main x64; do br $v 125m --shape 125m --batch 4 --seq 8192; done
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
step racecheck 60 $CS --tool racecheck --kernel-name kns=nsa_window_fwd $B/nsa-main check --gpu --part window
tail -4 "$OUT/$P-racecheck.log" >> "$OUT/$P-summary.txt"
step train-main 40 $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4
grep -E "^\|" "$OUT/$P-train-main.log" | tail -4 >> "$OUT/$P-summary.txt"
summarize
