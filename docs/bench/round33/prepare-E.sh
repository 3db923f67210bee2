#!/bin/bash
# Builds what call-E.sh runs, on the CPU machine, from this repository at round 33's commit:
#   bash docs/bench/round33/prepare-E.sh .gpuNN     (then: run call-E.sh with B=.gpuNN, carry it)
# Old cubins from the tree as it is; then slab-loader.diff applied: new cubins, the
# three-warpgroup variant, the release build and its kernel cache; the diff is taken back out.
set -eu
B=${1:?folder for the device files, listed in .git/info/exclude}
grep -qx "$B/" .git/info/exclude || echo "$B/" >> .git/info/exclude
mkdir -p "$B"
PY=.tools/torch-venv/bin/python
NV=docs/bench/round31/nvrtc_build.py
$PY $NV nsa-sys/kernels/window_fwd.cu sm_90a "$B/wf_old.cubin" > /dev/null
$PY $NV nsa-sys/kernels/window_bwd.cu sm_90a "$B/wb_old.cubin" > /dev/null
git apply docs/bench/round33/slab-loader.diff
trap 'git checkout -- nsa-sys/' EXIT
$PY $NV nsa-sys/kernels/window_fwd.cu sm_90a "$B/wf_fl.cubin" > /dev/null
$PY $NV nsa-sys/kernels/window_bwd.cu sm_90a "$B/wb_fl.cubin" > /dev/null
$PY $NV docs/bench/round33/x_window_fwd_wg3.cu sm_90a "$B/wf_wg3.cubin" > /dev/null
LIBTORCH=$PWD/.libtorch CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/rel-target} cargo build --release -p nsa-train
cp "${CARGO_TARGET_DIR:-/work/rel-target}/release/nsa-train" "$B/nsa-main" && strip "$B/nsa-main"
rm -rf /tmp/kcache-E && LD_LIBRARY_PATH=$PWD/.libtorch/lib "$B/nsa-main" kernels --arch 90 --cache-dir /tmp/kcache-E > /dev/null
(cd /tmp/kcache-E && tar czf "$OLDPWD/$B/kcache.tgz" .)
(cd "$B" && tar czf bins.tgz nsa-main && rm nsa-main)
ls -la "$B"
