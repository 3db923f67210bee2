#!/bin/bash
# Session 30, call D: real text, `small` at S = 2048 and 8192 (configs/text-small-s*.toml):
# dense, NSA with the default MLP phi, NSA with phi = "mean" and with phi = "mean_mlp", same seed,
# data order and tokens (the shards of `cargo xtask corpus` + tokenizer + prepare, carried in
# .gpu30data/data); the kernel cache restored from .gpu30k. One tar under $OUT. Prints as it goes.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
unset RUST_BACKTRACE
P=D
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-565}))
C=$PWD/configs; R=/tmp/r30/runs; X=$PWD/.gpu30/nsa-train; L=/tmp/r30/logs; D=$PWD/.gpu30data/data; mkdir -p $R $L
chmod +x $X
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
left() { local l=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( l < 5 ? 5 : l )); }
say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
accs() { grep -E "^step .*acc" $1 | awk '{print $2, $NF}' | tr '\n' ';'; echo; }
pack() {
  for r in $R/*/; do [[ -d $r ]] || continue; n=$(basename $r); mkdir -p $L/runs/$n; cp $r/config.toml $r/metrics.jsonl $r/summary.json $L/runs/$n/ 2>/dev/null; done
  tar czf $OUT/$P-logs.tgz -C $L . ; }
train() { # name config extra...
  local n=$1 cfg=$2; shift 2
  timeout -s TERM $(left 25) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" "$@" > $L/$P-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $L/$P-$n.log)" | cut -c1-300; grep "^steps" $L/$P-$n.log; pack
}
ev() { # run len
  timeout $(left 3) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 --inspect --json $L/$P-eval-$1-len$2.json > $L/$P-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $L/$P-eval-$1-len$2.log | grep -vE "^/tmp|^no-binding|^wrote|^\| --- " | cut -c1-150 | head -40; pack
}
# The exit fix (finish_prebuilds): a 3-step NSA run with a cold kernel cache under cuda-gdb
# (training needs no decode kernels: their build still runs when the steps end; call C's dense
# run stopped on SIGSEGV inside nvrtcCompileProgram there), then a dense run's exit status with
# a cold cache (it now builds the pointwise family alone); in the background.
( XDG_CACHE_HOME=/tmp/xg timeout 120 cuda-gdb -q -batch -ex run -ex bt --args $X train --config $C/recall-small-short.toml --name gdbfix --overwrite \
    --set run.out_dir=\"/tmp/crash\" --set model.attention=\"nsa\" --set run.steps=3 --set data.batch_size=8 --set run.eval_every=0 > $L/$P-gdbfix.log 2>&1
  say "gdbfix exit=$? SIGSEGV lines: $(grep -c SIGSEGV $L/$P-gdbfix.log) exited-normally: $(grep -c 'exited normally' $L/$P-gdbfix.log)"
  XDG_CACHE_HOME=/tmp/xh timeout 120 $X train --config $C/recall-small-short.toml --name coldfix --overwrite \
    --set run.out_dir=\"/tmp/crash\" --set model.attention=\"dense\" --set run.steps=3 --set data.batch_size=8 --set run.eval_every=0 > $L/$P-coldfix.log 2>&1
  say "coldfix exit=$?" ) &
K=$HOME/.cache/nsa/kernels; mkdir -p $K && tar xzf .gpu30k/kcache.tgz -C $K
$X kernels > $L/$P-kernels.log 2>&1; say "kernels exit=$?"
TXT=(--set data.path=\"$D/shards\" --set data.tokenizer=\"$D/tokenizer.json\")
for s in 2048 8192; do
  train text-dense-s$s text-small-s$s.toml --set model.attention=\"dense\" "${TXT[@]}"
  for phi in mlp mean mean_mlp; do
    train text-nsa-$phi-s$s text-small-s$s.toml --set model.attention=\"nsa\" --set model.nsa.phi=\"$phi\" "${TXT[@]}"
  done
done
wait
pack
