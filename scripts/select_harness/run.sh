#!/bin/bash
# Times staged versions of the selection kernel (prepare.py) on the GPU machine and compares
# their block ids. usage: run.sh DIR NAME:TOKEN_INTS [NAME:TOKEN_INTS ...]
# TOKEN_INTS: the per-token ints and floats of that version's shared-memory layout after its
# ring and lists (3 before the marked-token kernel, 5 with it; glue/fused.cpp's formula).
# Output: one line per (version, shape) with the median (min, max) of 10 launches, then
# whether each version's ids equal the first's, shape by shape. COMPILE_ONLY=1 compiles and
# stops (nvcc can run in the background while something else uses the GPU); a later run
# reuses a binary in /tmp/sel that is newer than its staged compressed.cu.
set -u
dir=$1; shift
here=$(dirname "$0")
mkdir -p /tmp/sel
names=()
for spec in "$@"; do
  name=${spec%%:*}; ints=${spec##*:}; names+=("$name")
  src=$(realpath "$dir/$name")/compressed.cu
  # Compiled by an earlier run (COMPILE_ONLY) since prepare.py staged this version: reuse it.
  [ -x "/tmp/sel/$name" ] && [ "/tmp/sel/$name" -nt "$src" ] && continue
  nvcc -O3 -std=c++17 -arch=sm_90 -I "$dir/$name" -DSEL_SRC="\"$src\"" \
    -DSEL_NAME="\"$name\"" -DSEL_TOKEN_INTS="$ints" -o "/tmp/sel/$name" "$here/harness.cu" \
    > "/tmp/sel/$name.nvcc.log" 2>&1 &
done
wait
[ -n "${COMPILE_ONLY:-}" ] && exit 0
for name in "${names[@]}"; do
  grep -H "error" "/tmp/sel/$name.nvcc.log"
  cuobjdump --dump-resource-usage "/tmp/sel/$name" 2>&1 | grep -A1 cmp_select \
    | grep -oE "Function [a-z0-9_]+|REG:[0-9]+|STACK:[0-9]+|LOCAL:[0-9]+" | paste -sd' ' \
    | sed "s/Function/\n$name/g"
done
echo
i=0
# B S G dk warps: the 125m shape (G = 3, dk 64) and the paper shape (G = 16, dk 192).
for shape in "1 32768 3 64 4" "4 8192 3 64 4" "1 131072 3 64 4" "3 4097 3 64 4" "2 100 3 64 4" \
             "1 65536 16 192 4" "1 65536 16 192 8" "1 131072 16 192 8"; do
  i=$((i + 1))
  for name in "${names[@]}"; do
    timeout 60 "/tmp/sel/$name" $shape "/tmp/sel/ids-$name-$i"
  done
  for name in "${names[@]:1}"; do
    if cmp -s "/tmp/sel/ids-${names[0]}-$i" "/tmp/sel/ids-$name-$i"; then
      echo "shape $shape: $name ids equal ${names[0]}'s"
    else
      echo "shape $shape: $name ids DIFFER from ${names[0]}'s"
    fi
  done
done
