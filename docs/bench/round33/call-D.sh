#!/bin/bash
# Session 44, call D (round 33, H200, run inline): Nsight Compute's speed-of-light, scheduler
# and warp-state sections for round 32's window kernels (the old cubins), paper shape, 16k.
B=.gpu44; P=D; LIM=300; source docs/bench/call-lib.sh; PY=/opt/torch/.venv/bin/python
echo "ncu=$NCU" >> $OUT/D-summary.txt
timeout 120 $NCU --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --kernel-name regex:nsa_window_fwd_dk192_dv128 --launch-count 1 \
  $PY docs/bench/round33/wf2_harness.py bench $B/wf_old.cubin $B/wf_new.cubin $B/wfx.cubin > $OUT/D-ncu-fwd.txt 2>&1
say "ncu fwd rc=$?"
timeout 120 $NCU --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
  --kernel-name regex:nsa_window_bwd_d --launch-count 2 \
  $PY docs/bench/round33/wb2_harness.py $B/wb_old.cubin bench > $OUT/D-ncu-bwd.txt 2>&1
say "ncu bwd rc=$?"
grep -E "^  nsa_|Duration|Throughput|Stall|Issued|Eligible|No Eligible|Active Warps|Compute \(SM\)|Memory \[" $OUT/D-ncu-*.txt | head -60 >> $OUT/D-summary.txt
summarize
