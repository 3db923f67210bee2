#!/bin/bash
# Session 42, call A (round 31): the wgmma window forward. (1) wf_harness.py on the NVRTC cubin
# of window_fwd.cu with the experimental variants (x_*): parity with an fp32 reference and
# flash's backward on its out / lse, then times against libtorch's flash forward; (2) the window
# part of the GPU check on the build; (3) bench branches, window only, paper and 125m shapes.
B=.gpu42; P=A; LIM=560
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python
timeout 150 $PY $B/wf_harness.py $B/wf.cubin > "$OUT/$P-harness.log" 2>&1
say "harness rc=$? ok=$(grep -c '^ok' $OUT/$P-harness.log)"
grep -v "^ok" "$OUT/$P-harness.log" | tail -24 >> "$OUT/$P-summary.txt"
check_part main window
timeout 200 $B/nsa-main bench branches --branch window --shape paper --seq 16384,65536 --repeats 5 > "$OUT/$P-branches-paper.log" 2>&1
say "branches paper rc=$?"
timeout 100 $B/nsa-main bench branches --branch window --shape 125m --batch 4 --seq 8192 --repeats 5 > "$OUT/$P-branches-125m.log" 2>&1
say "branches 125m rc=$?"
grep -hE "^\| (paper|125m)" "$OUT/$P"-branches-*.log >> "$OUT/$P-summary.txt"
summarize
