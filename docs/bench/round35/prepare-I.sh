#!/bin/bash
# Builds what call-I.sh (and its short form call-J.sh) runs, on the CPU machine, from this
# repository at round 35's main (a clean tree):
#   bash docs/bench/round35/prepare-I.sh .gpuNN     (then: run call-I.sh with B=.gpuNN, carry it)
# nsa-main: the tree as it is; nsa-unp: with unp.diff (no zero-padded value columns when the
# wgmma window kernels run both ways); nsa-dq3: with round 34's dq-wgs.diff (the dQ kernel
# with three warpgroups and 32 keys a tile at dv = 128); nsa-ud: with ud.diff (both, the form
# to land); nsa-x64: four warpgroups in the window forward at dk = dv = 64 too. Each diff is
# taken out again after its build. wb.cubin, xdq.cubin: window_bwd.cu and round 34's
# x_window_bwd_dq.cu by NVRTC (for wb3_harness.py); one kernel cache for every build.
source docs/bench/prepare-lib.sh "${1:-}"
nvrtc_cubin nsa-sys/kernels/window_bwd.cu "$B/wb.cubin"
nvrtc_cubin docs/bench/round34/x_window_bwd_dq.cu "$B/xdq.cubin"
restore() { git checkout -- nsa-sys/ nsa-attn/ ARCHITECTURE.md; }
trap restore EXIT
build nsa-main
for v in unp:docs/bench/round35/unp.diff dq3:docs/bench/round34/dq-wgs.diff ud:docs/bench/round35/ud.diff; do
  git apply "${v#*:}"
  build "nsa-${v%%:*}"
  restore
done
window_fwd_x64
build nsa-x64
restore
finish
