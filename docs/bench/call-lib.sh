#!/bin/bash
# Helpers for device calls (the GPU host has no cargo; see the rounds' call-*.sh for what each
# call ran). Source it from a call script run in the repository root on the GPU host:
#
#   B=.gpuNN; P=A; LIM=400            # binaries folder (carried), log prefix, seconds budget
#   source docs/bench/call-lib.sh     # sets LD_LIBRARY_PATH, unpacks $B/kcache.tgz, $B/bins.tgz
#   step check 40 $B/nsa-main check --gpu   # any command, its log $OUT/$P-check.log
#   check_part head decode            # nsa-head check --gpu --part decode -> $OUT/$P-check-head.log
#   bench_decode head 1               # the 64k decode bench (paper and 125m, batch 1 and 8)
#   ncu_decode head 8                 # per-kernel durations of one decode step at 64k x 8
#   summarize                         # the summary lines of every log above, then a tarball
#
# Binaries are $B/nsa-<variant> (or inside $B/bins.tgz); every step is skipped once fewer than
# its own seconds are left of $LIM, and its exit status and time go to $OUT/$P-summary.txt.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
S0=$(date +%s)
say() { echo "$* t=$(( $(date +%s) - S0 ))" >> "$OUT/$P-summary.txt"; }
left() { echo $(( ${LIM:-300} - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels
[ -f "$B/kcache.tgz" ] && tar xzf "$B/kcache.tgz" -C ~/.cache/nsa/kernels
[ -f "$B/bins.tgz" ] && tar xzf "$B/bins.tgz" -C "$B"
chmod +x "$B"/nsa-* 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/$P-device.txt"
cat "$OUT/$P-device.txt" >> "$OUT/$P-summary.txt"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)

step() {  # name, seconds, command...: skipped when fewer than its seconds are left; the log's
  # FAIL and sanitizer summary lines go to the summary
  local n=$1 t=$2; shift 2
  [ "$(left)" -gt "$t" ] || { say "skip $n"; return; }
  timeout "$t" "$@" > "$OUT/$P-$n.log" 2>&1; say "$n rc=$?"
  grep -E "FAILS|FAIL |ERROR SUMMARY" "$OUT/$P-$n.log" | head -8 >> "$OUT/$P-summary.txt"
}
check_part() {  # variant, part
  [ "$(left)" -gt 60 ] || { say "skip check $1 $2"; return; }
  timeout 120 "$B/nsa-$1" check --gpu --part "$2" > "$OUT/$P-check-$1-$2.log" 2>&1
  say "check $1 $2 rc=$?"
  tail -1 "$OUT/$P-check-$1-$2.log" >> "$OUT/$P-summary.txt"
  grep -iE "\| fail" "$OUT/$P-check-$1-$2.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
}
bench_decode() {  # variant, tag
  [ "$(left)" -gt 30 ] || { say "skip bench $1 $2"; return; }
  timeout 45 "$B/nsa-$1" bench decode --device cuda --seq 65536 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset 125m --prompt 32768 --new-tokens 64 --generation-runs 3 \
    > "$OUT/$P-bench-$1-$2.log" 2>&1
  say "bench $1 $2 rc=$?"
}
ncu_decode() {  # variant, batch
  [ -n "$NCU" ] && [ "$(left)" -gt 25 ] || { say "skip ncu $1 b$2"; return; }
  timeout 30 "$NCU" --cache-control none --clock-control none --kernel-name regex:nsa_dec \
    --launch-count 10 "$B/nsa-$1" bench decode --device cuda --seq 65536 --shape paper \
    --batch "$2" --repeats 1 --preset none > "$OUT/$P-ncu-$1-b$2.txt" 2>&1
  say "ncu $1 b$2 rc=$?"
}
summarize() {
  local f
  for f in "$OUT/$P"-bench-*.log; do
    [ -f "$f" ] || continue
    echo "== $f"
    grep -E "^\| (paper|125m) \| [0-9]" "$f" | sort -u | awk -F'|' \
      '{print $2,$3,$4,"graph",$6,"emit",$7,"attn",$9,"dense",$11,"ratio",$12}'
    grep -E "^\| 125m \| nsa" "$f" | awk -F'|' '{print "gen graph",$9,"split",$11}'
  done >> "$OUT/$P-summary.txt"
  for f in "$OUT/$P"-ncu-*-b*.txt; do
    [ -f "$f" ] || continue
    echo "== $f"
    grep -E "^  nsa_dec|Duration" "$f" | paste - - | awk '{print $1, $(NF)}'
  done >> "$OUT/$P-summary.txt"
  cat "$OUT/$P-summary.txt"
  (cd "$OUT" && tar czf "$P-logs.tgz" --exclude "$P-logs.tgz" "$P"-* && find . -maxdepth 1 -name "$P-*" ! -name "$P-logs.tgz" ! -name "$P-summary.txt" -delete)
}
