#!/bin/bash
# Session 29, call D: issue 15, the MLP φ with its linear maps initialised normal(0, 1/sqrt(fan_in))
# (nsa-train-p = branch wip/phi-init; main initialises them normal(0, 0.02), which leaves the
# compressed keys and values ~12x smaller than raw ones): the three stages (S = 128, 1024, 4096),
# the final model evaluated by generation with --inspect. One tar under $OUT. Prints as it goes.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
unset RUST_BACKTRACE
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-560}))
C=$PWD/configs; R=/tmp/r29/runs; X=$PWD/.gpu29/nsa-train-p; L=/tmp/r29/logs; mkdir -p $R $L
chmod +x $X
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/D-device.txt
left() { local l=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( l < 5 ? 5 : l )); }
say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
accs() { grep -E "^step .*acc" $1 | awk '{print $2, $NF}' | tr '\n' ';'; echo; }
pack() {  # the logs, and each run's config, metrics and summary (no checkpoints)
  for r in $R/*/; do n=$(basename $r); mkdir -p $L/runs/$n; cp $r/config.toml $r/metrics.jsonl $r/summary.json $L/runs/$n/ 2>/dev/null; done
  tar czf $OUT/D-logs.tgz -C $L . ; }
train() { # name config extra...
  local n=$1 cfg=$2; shift 2
  timeout -s TERM $(left 20) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" "$@" > $L/D-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $L/D-$n.log)"; grep "^steps" $L/D-$n.log; pack
}
ev() { # run len
  timeout $(left 3) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 --inspect --json $L/D-eval-$1-len$2.json > $L/D-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $L/D-eval-$1-len$2.log | grep -vE "^/tmp|^no-binding|^wrote|^\| --- " | cut -c1-150; pack
}
$X kernels > $L/D-kernels.log 2>&1; say "kernels exit=$?"
train p-short recall-small-short.toml --set run.steps=600
train p-s1024 recall-small-s1024.toml --set run.init_from=\"$R/p-short\" --set run.eval_every=250
(( $(left) > 140 )) && train p-s4096f recall-small-s4096.toml --set run.init_from=\"$R/p-s1024\" --set run.eval_every=250
(( $(left) > 6 )) && ev p-s4096f 4096
pack
