#!/bin/bash
# Session 30, call A: (1) `nsa-train check --gpu` of main c4ab990 in the background (first GPU run
# of the mean_mlp rows); (2) issue 15 at S = 16384, NSA with phi = "mean": stage 1 (S = 128, 600
# steps) -> S = 1024 -> S = 4096 -> S = 16384 (configs/recall-small-s16384.toml), each continued
# through run.init_from; the 4096 model evaluated at 4096, the 16384 model at 16384 and 32768.
# One tar under $OUT (the device returns at most 8 files). Prints as it goes.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
unset RUST_BACKTRACE
P=${P:-A}; ATT=${ATT:-nsa}
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-565}))
C=$PWD/configs; R=/tmp/r30/runs; X=$PWD/.gpu30/nsa-train; L=/tmp/r30/logs; mkdir -p $R $L
chmod +x $X
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
left() { local l=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( l < 5 ? 5 : l )); }
say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
accs() { grep -E "^step .*acc" $1 | awk '{print $2, $NF}' | tr '\n' ';'; echo; }
pack() {  # the logs, and each run's config, metrics and summary (no checkpoints)
  for r in $R/*/; do [[ -d $r ]] || continue; n=$(basename $r); mkdir -p $L/runs/$n; cp $r/config.toml $r/metrics.jsonl $r/summary.json $L/runs/$n/ 2>/dev/null; done
  tar czf $OUT/$P-logs.tgz -C $L . ; }
train() { # name config extra...
  local n=$1 cfg=$2; shift 2
  timeout -s TERM $(left 25) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" --set model.attention=\"$ATT\" "$@" > $L/$P-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $L/$P-$n.log)"; grep "^steps" $L/$P-$n.log; pack
}
ev() { # run len
  timeout $(left 3) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 ${INSPECT---inspect} --json $L/$P-eval-$1-len$2.json > $L/$P-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $L/$P-eval-$1-len$2.log | grep -vE "^/tmp|^no-binding|^wrote|^\| --- " | cut -c1-150 | head -40; pack
}
if [[ ${CHECK:-1} == 1 ]]; then
  $X kernels > $L/$P-kernels.log 2>&1; say "kernels exit=$?"
  ( timeout $(left 8) $X check --gpu > $L/$P-check.log 2>&1; echo "check exit=$? t=$(( $(date +%s) - S0 ))" > $L/$P-check-done.txt ) &
fi
PHI=${PHI:-mean}
a=$ATT-$PHI
train $a-short recall-small-short.toml --set run.steps=600 --set model.nsa.phi=\"$PHI\"
train $a-s1024 recall-small-s1024.toml --set run.init_from=\"$R/$a-short\" --set run.eval_every=250 --set model.nsa.phi=\"$PHI\"
train $a-s4096 recall-small-s4096.toml --set run.init_from=\"$R/$a-s1024\" --set run.eval_every=250 --set model.nsa.phi=\"$PHI\"
(( $(left) > 250 )) && ev $a-s4096 4096
if [[ ${TO16K:-1} == 1 ]]; then
  train $a-s16384 recall-small-s16384.toml --set run.init_from=\"$R/$a-s4096\" --set run.eval_every=250 --set model.nsa.phi=\"$PHI\"
  (( $(left) > 15 )) && ev $a-s16384 16384
  (( $(left) > 15 )) && ev $a-s16384 32768
fi
wait
cat $L/$P-check-done.txt 2>/dev/null; grep -iE "GPU checks|fail" $L/$P-check.log | tail -5
pack
