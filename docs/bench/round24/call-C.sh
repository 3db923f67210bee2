# Round 24, call C: the round's last build `sampler` (2939942) against `main` (a8fa71d): the
# decode part of the GPU check (what changed after call A's checks of `new`), bench decode alternated (8k, 64k, with generation), the launch sequence of one
# layer step (ncu), then the decode sweep over every cached length. Budget-guarded: a step
# that would pass 330 s is skipped.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
B=.gpu35
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))" >> $OUT/C-summary.txt; }
left() { echo $(( 330 - ($(date +%s) - S0) )); }
mkdir -p ~/.cache/nsa/kernels && tar xzf $B/kcache.tgz -C ~/.cache/nsa/kernels
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/C-device.txt
cat $B/variants.txt >> $OUT/C-device.txt
timeout 150 $B/nsa-sampler check --gpu --part decode > $OUT/C-check.log 2>&1; say "check rc=$?"
grep "FAIL\|checks passed\|checks failed" $OUT/C-check.log >> $OUT/C-summary.txt
bench() {  # variant, tag, seqs, preset
  [ $(left) -gt 60 ] || { say "skip $1 $2"; return; }
  timeout $(left) $B/nsa-$1 bench decode --device cuda --seq $3 --shape paper,125m --batch 1,8 \
    --repeats 10 --preset $4 --prompt 32768 --new-tokens 64 --generation-runs 3 > $OUT/C-bench-$1-$2.log 2>&1
  say "bench $1 $2 rc=$?"
}
bench sampler 1 8192,65536 125m
bench main 1 8192,65536 125m
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ $(left) -gt 120 ]; then
  timeout 80 $NCU --metrics gpu__time_duration.sum --print-summary per-kernel \
    $B/nsa-sampler bench decode --device cuda --seq 65536 --shape 125m --batch 1 --repeats 1 --preset none \
    > $OUT/C-ncu-sampler.log 2>&1; say "ncu rc=$?"
fi
bench sampler sweep 8192,16384,32768,65536,131072 none
bench sampler 2 8192,65536 125m
cd $OUT && tar czf C-logs.tgz C-*.log C-device.txt && cd - > /dev/null
cat $OUT/C-summary.txt
for f in $OUT/C-bench-*.log; do echo "== $f"; grep "^| paper\|^| 125m" $f | cut -d'|' -f2-10; done
