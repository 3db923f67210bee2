#!/bin/bash
# Session 29, call C: issue 15, phi = "mean" (which learned recall at S = 4096 in call B): the
# three stages (S = 128, 1024, 4096) again, the final model evaluated by generation with --inspect
# at 1x, 2x and 4x its length; then stage 1 straight to S = 4096 (without the S = 1024 stage).
# Everything under $OUT goes into one tar (the device returns at most 8 files). Prints as it goes.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
unset RUST_BACKTRACE
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-560}))
C=$PWD/configs; R=/tmp/r29/runs; X=$PWD/.gpu29/nsa-train-i; L=/tmp/r29/logs; mkdir -p $R $L
chmod +x $X
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/C-device.txt
left() { local l=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( l < 5 ? 5 : l )); }
say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
accs() { grep -E "^step .*acc" $1 | awk '{print $2, $NF}' | tr '\n' ';'; echo; }
pack() { tar czf $OUT/C-logs.tgz -C $L . ; }
train() { # name config extra...
  local n=$1 cfg=$2; shift 2
  timeout -s TERM $(left 20) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" "$@" > $L/C-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $L/C-$n.log)"; grep "^steps" $L/C-$n.log; pack
}
ev() { # run len
  timeout $(left 3) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 --inspect --json $L/C-eval-$1-len$2.json > $L/C-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $L/C-eval-$1-len$2.log | grep -vE "^/tmp|^no-binding|^wrote|^\| --- " | cut -c1-150; pack
}
$X kernels > $L/C-kernels.log 2>&1; say "kernels exit=$?"
# 1. The three stages again, evaluated at 1x, 2x and 4x the trained 4096.
train mean-short recall-small-short.toml --set run.steps=600 --set model.nsa.phi=\"mean\"
train mean-s1024 recall-small-s1024.toml --set run.init_from=\"$R/mean-short\" --set run.eval_every=250 --set model.nsa.phi=\"mean\"
train mean-s4096f recall-small-s4096.toml --set run.init_from=\"$R/mean-s1024\" --set run.eval_every=250 --set model.nsa.phi=\"mean\"
for len in 4096 8192 16384; do (( $(left) > 15 )) && ev mean-s4096f $len; done
# 2. Without the S = 1024 stage: stage 1 straight to S = 4096 (the curriculum's share).
(( $(left) > 150 )) && train mean-s4096 recall-small-s4096.toml --set run.init_from=\"$R/mean-short\" --set run.eval_every=250 --set model.nsa.phi=\"mean\"
(( $(left) > 8 )) && ev mean-s4096 4096
pack
