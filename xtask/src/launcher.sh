#!/usr/bin/env bash
# nsa-train launcher: finds libtorch 2.11.0 on this host and runs the bundled binary.
# Order: $LIBTORCH, then the torch package of $NSA_PYTHON / python3 / python.
set -euo pipefail
want="2.11.0"
here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
tried=()

version_of() { # $1: libtorch folder -> prints major.minor.patch from include/torch/version.h
  local h
  for h in "$1/include/torch/headeronly/version.h" "$1/include/torch/csrc/api/include/torch/version.h" "$1/include/torch/version.h"; do
    [ -f "$h" ] && break
  done
  [ -f "$h" ] || return 1
  awk '/#define TORCH_VERSION_(MAJOR|MINOR|PATCH) /{v[$2]=$3} END{print v["TORCH_VERSION_MAJOR"]"."v["TORCH_VERSION_MINOR"]"."v["TORCH_VERSION_PATCH"]}' "$h"
}

torch=""
if [ -n "${LIBTORCH:-}" ]; then
  v="$(version_of "$LIBTORCH" || true)"
  if [ "$v" = "$want" ] && [ -f "$LIBTORCH/lib/libtorch_cpu.so" ]; then
    torch="$LIBTORCH"
  else
    tried+=("LIBTORCH=$LIBTORCH (version '${v:-none}')")
  fi
fi
if [ -z "$torch" ]; then
  for py in "${NSA_PYTHON:-}" python3 python; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)"
    if [ -z "$dir" ]; then tried+=("$py (no torch)"); continue; fi
    v="$(version_of "$dir" || true)"
    if [ "$v" = "$want" ]; then torch="$dir"; break; fi
    tried+=("$py torch at $dir (version '${v:-none}')")
  done
fi
if [ -z "$torch" ]; then
  echo "nsa-train: no libtorch $want found. Tried: ${tried[*]:-nothing}." >&2
  echo "Set LIBTORCH to a libtorch $want folder, or install torch==$want for python3." >&2
  exit 127
fi
export LD_LIBRARY_PATH="$torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/libexec/nsa-train" "$@"
