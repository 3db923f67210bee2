#!/bin/bash
# Round 36, call K (prepared for the next session: no machine was lent after call I; .gpu51 was
# made by prepare-K.sh at 15e8cbb). In
# $B/bins.tgz (prepare-K.sh): nsa-main (c9d6080's context binding and d802e58's window without
# zero-padded value columns, neither run on a GPU in its landed form), nsa-pad (main without
# d802e58), nsa-x64 (main with four warpgroups in the window forward at dk = dv = 64).
# First every GPU check on main (the fresh thread's row and the layer rows on the unpadded
# window are new), then the window branch main vs pad (paper 16k and 64k, twice; 125m 8k x 4
# with x64), the layer at 64k, training, racecheck on the window's backward kernels.
B=${B:-.gpu51}; P=K; LIM=${LIM:-480}
source docs/bench/call-lib.sh
chk() {  # variant, seconds, check args...
  local v=$1 t=$2; shift 2
  step check-$v $t $B/nsa-$v check --gpu "$@"; tail -1 "$OUT/$P-check-$v.log" >> "$OUT/$P-summary.txt"
  grep -iE "\| fail" "$OUT/$P-check-$v.log" | cut -c1-200 | head -10 >> "$OUT/$P-summary.txt"
  grep -E "no CUDA context" "$OUT/$P-check-$v.log" | cut -c1-200 >> "$OUT/$P-summary.txt"
}
br() {  # variant, tag, shape args...
  local v=$1 tag=$2; shift 2
  step br-$tag-$v 25 $B/nsa-$v bench branches --branch window "$@" --repeats 5
  grep -hE "^\| (paper|125m)" "$OUT/$P-br-$tag-$v.log" | grep "fused |" | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
}
chk main 150
for r in 1 2; do for v in main pad; do br $v paper$r --shape paper --seq 16384,65536; done; done
for v in main pad; do
  step attn-$v 35 $B/nsa-$v bench attn --path fused --seq 65536 --repeats 3
  grep -E "^\| 65536" "$OUT/$P-attn-$v.log" | cut -d"|" -f1-6 | sed "s/^/$v /" >> "$OUT/$P-summary.txt"
done
step train-main 40 $B/nsa-main bench train --device cuda --preset 125m --seq 8192,32768 --steps 4
grep -E "^\|" "$OUT/$P-train-main.log" | tail -4 >> "$OUT/$P-summary.txt"
for v in main pad x64; do br $v 125m --shape 125m --batch 4 --seq 8192; done
chk x64 50 --part window
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
step racecheck 70 $CS --tool racecheck --kernel-name kns=nsa_window_bwd $B/nsa-main check --gpu --part window
tail -4 "$OUT/$P-racecheck.log" >> "$OUT/$P-summary.txt"
summarize
