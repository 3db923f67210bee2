#!/bin/bash
# Builds what call-H.sh runs, on the CPU machine, from this repository at round 34's commit:
#   bash docs/bench/round34/prepare-H.sh .gpuNN     (then: run call-H.sh with B=.gpuNN, carry it)
# nsa-main: the release build of the tree as it is; nsa-x64: the same with four warpgroups in
# the window forward at dk = dv = 64 too (window_fwd.cu's and the glue's (64, 64) rows edited,
# then put back); nsa-dq3: the build with dq-wgs.diff applied (the dQ kernel with three
# warpgroups and 32 keys a tile at dv = 128, in the library), then taken out again; wb.cubin and
# xdq.cubin: window_bwd.cu and x_window_bwd_dq.cu by NVRTC; one kernel cache for the builds.
# An nsa-old already in the folder's bins.tgz is kept.
source docs/bench/prepare-lib.sh "${1:-}"
[ -f "$B/bins.tgz" ] && tar xzf "$B/bins.tgz" -C "$W/bins" && find "$W/bins" -type f ! -name nsa-old -delete
nvrtc_cubin nsa-sys/kernels/window_bwd.cu "$B/wb.cubin"
nvrtc_cubin docs/bench/round34/x_window_bwd_dq.cu "$B/xdq.cubin"
build nsa-main
trap 'git checkout -- nsa-sys/' EXIT
sed -i 's/^NSA_WINDOW_FWD(64, 64, 64, 2)/NSA_WINDOW_FWD(64, 64, 64, 4)/' nsa-sys/kernels/window_fwd.cu
sed -i 's/{{64, 64, 64, 2}/{{64, 64, 64, 4}/' nsa-sys/glue/window.cpp
build nsa-x64
git checkout -- nsa-sys/
git apply docs/bench/round34/dq-wgs.diff
build nsa-dq3
git checkout -- nsa-sys/
LIBTORCH=$PWD/.libtorch CARGO_TARGET_DIR=$T cargo build -q --release -p nsa-train
pack
