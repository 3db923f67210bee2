#!/bin/bash
# Session 29, call A: (1) the full GPU check of main 9458f54 (the merged held-activation
# functions and cmp_rope together), in the background; (2) issue 15, NSA alone, one run at a
# time: stage 1 (S = 128, 600 steps); the S = 1024 stage from it (every block selected: can the
# selected branch learn the binding beyond the window?), evaluated by generation at 1024 and 4096;
# then S = 4096 from the S = 1024 model; then shared_kv = true through stages 1 and 2.
# Each run is cut at the call's deadline; prints as it goes.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
unset RUST_BACKTRACE
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-570}))
C=$PWD/configs; R=/tmp/r29/runs; X=$PWD/.gpu29/nsa-train; mkdir -p $R
chmod +x $X
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/A-device.txt
left() { local l=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( l < 5 ? 5 : l )); }
say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
accs() { grep -E "^step .*acc" $1 | awk '{print $2, $NF}' | tr '\n' ';'; echo; }
train() { # name config extra...
  local n=$1 cfg=$2; shift 2
  timeout -s TERM $(left 25) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" "$@" > $OUT/A-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $OUT/A-$n.log)"; grep "^steps" $OUT/A-$n.log
}
ev() { # run len
  timeout $(left 5) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 --json $OUT/A-eval-$1-len$2.json > $OUT/A-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $OUT/A-eval-$1-len$2.log | tail -13
}
$X kernels > $OUT/A-kernels.log 2>&1; say "kernels exit=$?"
( $X check --gpu > $OUT/A-check.log 2>&1; echo "check exit=$? t=$(( $(date +%s) - S0 ))" > $OUT/A-check-done.txt ) &
train base-short recall-small-short.toml --set run.steps=600
train base-s1024 recall-small-s1024.toml --set run.init_from=\"$R/base-short\" --set run.eval_every=100
ev base-s1024 1024
(( $(left) > 100 )) && ev base-s1024 4096
(( $(left) > 60 )) && train base-s4096f recall-small-s4096.toml --set run.init_from=\"$R/base-s1024\" --set run.eval_every=100
(( $(left) > 20 )) && ev base-s4096f 4096
cat $OUT/A-check-done.txt 2>/dev/null; grep -iE "passed|failed" $OUT/A-check.log | tail -3
if (( $(left) > 120 )); then
  train skv-short recall-small-short.toml --set run.steps=600 --set model.nsa.shared_kv=true
  train skv-s4096 recall-small-s4096.toml --set run.init_from=\"$R/skv-short\" --set run.eval_every=100 --set model.nsa.shared_kv=true
  ev skv-s4096 4096
fi
wait
cat $OUT/A-check-done.txt; grep -iE "passed|failed" $OUT/A-check.log | tail -3
