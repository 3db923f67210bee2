#!/bin/bash
# Session 41, call A (round 30): (1) the sliding window on cuDNN (window_cudnn_proto.py: band
# chunks with a broadcast bias over overlapping key spans, against libtorch's flash window);
# (2) round 29's prepared decode-tiles-load-shared.diff: decode check on it, decode bench
# alternated with main (03a28c9).
B=.gpu41; P=A; LIM=560
source docs/bench/call-lib.sh
PY=/opt/torch/.venv/bin/python; [ -x $PY ] || PY=python3
timeout 240 $PY docs/bench/round30/window_cudnn_proto.py \
  > "$OUT/$P-window-proto.log" 2>&1
say "window proto rc=$?"
grep -vE "^\s*$" "$OUT/$P-window-proto.log" | tail -20 >> "$OUT/$P-summary.txt"
check_part ls decode
bench_decode main 1
bench_decode ls 1
bench_decode main 2
bench_decode ls 2
summarize
