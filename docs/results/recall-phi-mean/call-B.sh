#!/bin/bash
# Session 29, call B (template of C and D): issue 15 with the --inspect diagnostic (nsa-train-i = main + eval --inspect):
# NSA alone, one run at a time, three stages (S = 128, 1024, 4096) for the default φ ("raw") and
# for phi = "mean"; each stage-2/3 model evaluated by generation with --inspect (gates, branch
# contributions, the value block's score lift per layer). Everything under $OUT goes into one tar
# (the device returns at most 8 files). Prints as it goes.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
unset RUST_BACKTRACE
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-560}))
C=$PWD/configs; R=/tmp/r29/runs; X=$PWD/.gpu29/nsa-train-i; L=/tmp/r29/logs; mkdir -p $R $L
chmod +x $X
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/B-device.txt
left() { local l=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( l < 5 ? 5 : l )); }
say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
accs() { grep -E "^step .*acc" $1 | awk '{print $2, $NF}' | tr '\n' ';'; echo; }
pack() { tar czf $OUT/B-logs.tgz -C $L . ; }
train() { # name config extra...
  local n=$1 cfg=$2; shift 2
  timeout -s TERM $(left 20) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" "$@" > $L/B-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $L/B-$n.log)"; grep "^steps" $L/B-$n.log; pack
}
ev() { # run len
  timeout $(left 3) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 --inspect --json $L/B-eval-$1-len$2.json > $L/B-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $L/B-eval-$1-len$2.log | grep -vE "^/tmp|^no-binding|^wrote|^\| --- " | cut -c1-150; pack
}
$X kernels > $L/B-kernels.log 2>&1; say "kernels exit=$?"
chain() { # prefix extra...
  local p=$1; shift
  train $p-short recall-small-short.toml --set run.steps=600 "$@"
  train $p-s1024 recall-small-s1024.toml --set run.init_from=\"$R/$p-short\" --set run.eval_every=250 "$@"
  ev $p-s1024 1024
  (( $(left) > 150 )) && train $p-s4096f recall-small-s4096.toml --set run.init_from=\"$R/$p-s1024\" --set run.eval_every=250 "$@"
  (( $(left) > 10 )) && ev $p-s4096f 4096
}
chain raw
(( $(left) > 200 )) && chain mean --set model.nsa.phi=\"mean\"
pack
