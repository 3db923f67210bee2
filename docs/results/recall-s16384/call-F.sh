#!/bin/bash
# Session 31, call A: issue 15's NSA (phi = mean) recall chain to S = 16384 through the S = 8192
# stage, stage 1 at its configured 1200 steps. Two stage-1 runs (seeds 1 and 2) in parallel;
# the one with the higher final answer accuracy is continued: S = 1024 -> 4096 -> 8192 -> 16384
# (each through run.init_from), the 16384 model evaluated at 16384 and 32768 by generation
# (--inspect). One tar of the logs.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
P=${P:-A}; ATT=${ATT:-nsa}; PHI=${PHI:-mean}
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-570}))
C=$PWD/configs; R=/tmp/r31/runs; X=$PWD/.gpu31/nsa-train; L=/tmp/r31/logs; mkdir -p $R $L
K=$HOME/.cache/nsa/kernels
chmod +x $X
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/$P-device.txt
git log -1 --format=%H > $L/$P-commit.txt 2>/dev/null
left() { local l=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( l < 5 ? 5 : l )); }
say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
accs() { grep -E "^step .*acc" $1 | awk '{print $2, $NF}' | tr '\n' ';'; echo; }
final_acc() { grep -E "^steps [0-9]" $1 | sed -E 's/.*answer accuracy ([0-9.]+).*/\1/'; }
pack() {
  for r in $R/*/; do [[ -d $r ]] || continue; n=$(basename $r); mkdir -p $L/runs/$n; cp $r/config.toml $r/metrics.jsonl $r/summary.json $L/runs/$n/ 2>/dev/null; done
  tar czf $OUT/$P-logs.tgz -C $L . ; }
train() { # name config extra...
  local n=$1 cfg=$2; shift 2
  timeout -s TERM $(left 25) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" --set model.attention=\"$ATT\" --set model.nsa.phi=\"$PHI\" "$@" > $L/$P-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $L/$P-$n.log)"; grep "^steps" $L/$P-$n.log; pack
}
ev() { # run len
  local insp=(); [[ $ATT == nsa ]] && insp=(--inspect)
  timeout $(left 3) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 "${insp[@]}" --json $L/$P-eval-$1-len$2.json > $L/$P-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $L/$P-eval-$1-len$2.log | grep -vE "^/tmp|^no-binding|^wrote|^\| --- " | cut -c1-150 | head -30; pack
}
mkdir -p $K && tar xzf .gpu31/kcache.tgz -C $K && say "kernel cache restored: $(ls $K | wc -l) files"
$X kernels > $L/$P-kernels.log 2>&1; say "kernels exit=$?"; tail -3 $L/$P-kernels.log
a=$ATT-$PHI
train $a-short-seed1 recall-small-short.toml --set run.seed=1 &
train $a-short-seed2 recall-small-short.toml --set run.seed=2 &
wait
a1=$(final_acc $L/$P-$a-short-seed1.log); a2=$(final_acc $L/$P-$a-short-seed2.log)
best=$a-short-seed1; awk "BEGIN{exit !(${a2:-0} > ${a1:-0})}" && best=$a-short-seed2
say "stage 1: seed1 $a1 seed2 $a2 -> $best"
train $a-s1024 recall-small-s1024.toml --set run.init_from=\"$R/$best\"
train $a-s4096 recall-small-s4096.toml --set run.init_from=\"$R/$a-s1024\"
train $a-s8192 recall-small-s8192.toml --set run.init_from=\"$R/$a-s4096\"
train $a-s16384 recall-small-s16384.toml --set run.init_from=\"$R/$a-s8192\"
(( $(left) > 12 )) && ev $a-s16384 16384
(( $(left) > 12 )) && ev $a-s16384 32768
(( $(left) > 40 )) && ev $a-s8192 8192
pack
