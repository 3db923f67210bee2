#!/bin/bash
# Helpers for the rounds' prepare-*.sh (builds for a device call, on the CPU machine; see
# call-lib.sh for the device side). Source it from the repository root with the folder as $1:
#
#   source docs/bench/prepare-lib.sh "$1"   # $B (listed in .git/info/exclude), $W (scratch)
#   nvrtc_cubin FILE.cu OUT.cubin           # an sm_90a cubin by NVRTC, for a Python harness
#   build nsa-main                          # the release nsa-train as $W/bins/nsa-main, its kernels
#                                           # compiled into $W/kc
#   window_fwd_x64                          # four warpgroups in the window forward at
#                                           # dk = dv = 64 (round 35's x64; undo: git checkout)
#   finish                                  # the release build back at the tree, then pack
#   pack                                    # $B/bins.tgz and $B/kcache.tgz; removes $W
set -eu
B=${1:?folder for the device files, listed in .git/info/exclude}
grep -qx "$B/" .git/info/exclude || echo "$B/" >> .git/info/exclude
mkdir -p "$B"
T=${CARGO_TARGET_DIR:-/work/rel-target}
W=$(mktemp -d)
mkdir -p "$W/bins" "$W/kc"
nvrtc_cubin() {
  .tools/torch-venv/bin/python docs/bench/round31/nvrtc_build.py "$1" sm_90a "$2" > /dev/null
}
build() {
  LIBTORCH=$PWD/.libtorch CARGO_TARGET_DIR=$T cargo build -q --release -p nsa-train
  cp "$T/release/nsa-train" "$W/bins/$1" && strip "$W/bins/$1"
  LD_LIBRARY_PATH=$PWD/.libtorch/lib "$W/bins/$1" kernels --arch 90 --cache-dir "$W/kc" > /dev/null
}
pack() {
  (cd "$W/bins" && tar czf "$OLDPWD/$B/bins.tgz" nsa-*)
  (cd "$W/kc" && tar czf "$OLDPWD/$B/kcache.tgz" .)
  rm -rf "$W"
  ls -la "$B"
}
window_fwd_x64() {
  sed -i 's/^NSA_WINDOW_FWD(64, 64, 64, 2)/NSA_WINDOW_FWD(64, 64, 64, 4)/' nsa-sys/kernels/window_fwd.cu
  sed -i 's/{{64, 64, 64, 2}/{{64, 64, 64, 4}/' nsa-sys/glue/window.cpp
}
finish() {
  LIBTORCH=$PWD/.libtorch CARGO_TARGET_DIR=$T cargo build -q --release -p nsa-train
  pack
}
