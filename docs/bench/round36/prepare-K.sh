#!/bin/bash
# Builds what call-K.sh runs, on the CPU machine, from this repository at round 36's main (a
# clean tree):
#   bash docs/bench/round36/prepare-K.sh .gpuNN     (then: run call-K.sh with B=.gpuNN, carry it)
# nsa-main: the tree as it is (the glue binding a thread's CUDA context, the window without
# zero-padded value columns); nsa-pad: the same with d802e58 taken out (the window's value
# columns padded as before, the context fix kept), the baseline for the window's timings;
# nsa-x64: four warpgroups in the window forward at dk = dv = 64 too (round 35's x64, which
# passed its check in call I but whose 125m timing failed on the context bug). Each change is
# taken out again after its build; one kernel cache for every build.
source docs/bench/prepare-lib.sh "${1:-}"
restore() { git checkout -- nsa-sys/ nsa-attn/ ARCHITECTURE.md; }
trap restore EXIT
build nsa-main
git diff d802e58 d802e58^ -- nsa-sys nsa-attn | git apply
build nsa-pad
restore
window_fwd_x64
build nsa-x64
restore
finish
