#!/bin/bash
# Session 44, call A (round 33): the ping-pong window kernels through the harnesses. Forward
# (wf2_harness.py): parity on fresh random inputs for every instantiation and variant, flash's
# backward on its out/lse, times against round 32's kernel and flash's forward. Backward
# (wb2_harness.py): the dq kernel in the same form (landed candidate) with round 32's dK/dV
# kernel, parity with fp32 autograd and times against round 32's; the dK/dV kernel in the
# ping-pong form as a variant (xcheck, xbench). Then the release build with the landed
# candidates: the window, layer and sync parts of the GPU check, bench branches (window), the
# layer at 64k, 125m training; compute-sanitizer on small cases last.
# The cubins in $B (NVRTC, round 31's nvrtc_build.py, sm_90a): wf_new / wb_new from
# window_fwd.cu / window_bwd.cu with window-pingpong.diff applied, wf_old / wb_old from 3d669e1's
# files, wfx / wbx from x_window_fwd.cu / x_window_bwd.cu (which need the diff applied too);
# nsa-main in bins.tgz is the release build of the tree with the diff applied.
B=.gpu44; P=A; LIM=${LIM:-300}
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
H=docs/bench/round33/wf2_harness.py
W=docs/bench/round33/wb2_harness.py
C="$B/wf_new.cubin $B/wf_old.cubin $B/wfx.cubin"
step() {  # name, seconds, command...: skipped when fewer than its seconds are left
  local n=$1 t=$2; shift 2
  [ "$(left)" -gt "$t" ] || { say "skip $n"; return; }
  timeout "$t" "$@" > "$OUT/$P-$n.log" 2>&1; say "$n rc=$?"
  grep -E "FAILS|FAIL |ERROR SUMMARY|hazard" "$OUT/$P-$n.log" | head -8 >> "$OUT/$P-summary.txt"
}
step fwd-small 40 $PY $H small $C
step fwd-bench 90 $PY $H bench $C; cat "$OUT/$P-fwd-bench.log" >> "$OUT/$P-summary.txt"
step bwd-check 100 $PY $W $B/wb_new.cubin check
step bwd-bench 90 $PY $W $B/wb_new.cubin bench $B/wb_old.cubin; grep -vi "old vs" "$OUT/$P-bwd-bench.log" | tail -30 >> "$OUT/$P-summary.txt"
step check 120 $B/nsa-main check --gpu --part window,layer,sync; tail -1 "$OUT/$P-check.log" >> "$OUT/$P-summary.txt"
grep -iE "\| fail" "$OUT/$P-check.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
step branches-paper 60 $B/nsa-main bench branches --branch window --shape paper --seq 65536 --repeats 5
step branches-125m 40 $B/nsa-main bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5
grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*.log | sort -u >> "$OUT/$P-summary.txt"
step fwd-check 100 $PY $H check $C
step xbwd-check 60 $PY $W $B/wb_new.cubin xcheck $B/wbx.cubin
step xbwd-bench 80 $PY $W $B/wb_new.cubin xbench $B/wbx.cubin; cat "$OUT/$P-xbwd-bench.log" >> "$OUT/$P-summary.txt"
step attn 60 $B/nsa-main bench attn --path fused --seq 65536 --repeats 3; grep -E "^\|" "$OUT/$P-attn.log" | tail -4 >> "$OUT/$P-summary.txt"
step train 100 $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4; grep -E "^\|" "$OUT/$P-train.log" | tail -6 >> "$OUT/$P-summary.txt"
for tool in memcheck racecheck synccheck; do
  step fwd-$tool 60 compute-sanitizer --tool $tool $PY $H small $C
  step bwd-$tool 60 compute-sanitizer --tool $tool $PY $W $B/wb_new.cubin small
done
cuobjdump --dump-sass $B/wf_new.cubin > "$OUT/$P-sass.txt" 2>&1; say "HGMMA lines $(grep -c HGMMA "$OUT/$P-sass.txt")"
summarize
