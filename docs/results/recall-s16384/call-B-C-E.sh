#!/bin/bash
# Session 30, calls B (ATT=dense) and C (ATT=nsa, PHI=mean): issue 15's recall chain to
# S = 16384 through an S = 8192 stage: stage 1 (S = 128, 600 steps) -> S = 1024 -> 4096 -> 8192
# (configs/recall-small-s8192.toml) -> 16384 (configs/recall-small-s16384.toml: 8 sequences x
# 1000 steps), each continued through run.init_from; the 4096 model evaluated at 4096, the 8192
# model at 8192, the 16384 model at 16384 and 32768 (by generation; NSA with --inspect).
# KSAVE=1 also builds the kernel cache in the background and returns it (kcache.tgz), which a
# later call restores from .gpu30k/ (saves the 40 s of NVRTC compiles). UPTO=4096 stops after
# the S = 4096 stage; STAGE1 sets stage 1's steps (600). One tar of the logs.
# Call E: P=E ATT=nsa PHI=mean_mlp UPTO=4096 STAGE1=800.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch
export LD_LIBRARY_PATH=$T/lib
unset RUST_BACKTRACE
P=${P:-B}; ATT=${ATT:-dense}; PHI=${PHI:-mean}
S0=$(date +%s); DEADLINE=$((S0 + ${BUDGET:-565}))
C=$PWD/configs; R=/tmp/r30/runs; X=$PWD/.gpu30/nsa-train; L=/tmp/r30/logs; mkdir -p $R $L
K=$HOME/.cache/nsa/kernels
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
  timeout -s TERM $(left 25) $X train --config $C/$cfg --name $n --overwrite --set run.out_dir=\"$R\" --set model.attention=\"$ATT\" --set model.nsa.phi=\"$PHI\" "$@" > $L/$P-$n.log 2>&1
  say "$n exit=$?"; echo "  acc: $(accs $L/$P-$n.log)"; grep "^steps" $L/$P-$n.log; pack
}
ev() { # run len
  local insp=(); [[ $ATT == nsa ]] && insp=(--inspect)
  timeout $(left 3) $X eval $R/$1 --task recall --len $2 --samples 32 --buckets 8 "${insp[@]}" --json $L/$P-eval-$1-len$2.json > $L/$P-eval-$1-len$2.log 2>&1
  say "eval $1 @ $2 exit=$?"; grep -vE "^\s*$" $L/$P-eval-$1-len$2.log | grep -vE "^/tmp|^no-binding|^wrote|^\| --- " | cut -c1-150 | head -30; pack
}
if [[ ${CRASH:-0} == 1 ]]; then
  # Call B's first dense run (the kernel cache cold: it compiled the pointwise kernels with NVRTC
  # itself) printed its summary, then died in exit with "free(): invalid pointer" (134). Repeat
  # it with a cold cache, with a warm one, and under cuda-gdb for a backtrace; in the background.
  crash() { # name cache-dir [gdb]
    local n=$1 xc=$2; shift 2
    XDG_CACHE_HOME=$xc timeout $(left 10) "$@" $X train --config $C/recall-small-short.toml --name $n --overwrite \
      --set run.out_dir=\"/tmp/crash\" --set model.attention=\"dense\" --set run.steps=3 --set data.batch_size=8 --set run.eval_every=0 > $L/$P-$n.log 2>&1
    say "$n exit=$?"; tail -2 $L/$P-$n.log
  }
  ( crash cold1 /tmp/xc1; crash warm1 /tmp/xc1; crash cold2 /tmp/xc2
    crash gdbcold /tmp/xc3 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args
    grep -n -A40 "received signal\|SIGABRT" $L/$P-gdbcold.log | head -60 ) &
fi
if [[ -f .gpu30k/kcache.tgz ]]; then mkdir -p $K && tar xzf .gpu30k/kcache.tgz -C $K && say "kernel cache restored: $(ls $K | wc -l) files"; fi
if [[ ${KSAVE:-0} == 1 ]]; then
  ( $X kernels > $L/$P-kernels.log 2>&1; tar czf $OUT/kcache.tgz -C $K . ; say "kernels exit=$? cache $(du -sh $OUT/kcache.tgz)" ) &
elif [[ $ATT == nsa ]]; then
  $X kernels > $L/$P-kernels.log 2>&1; say "kernels exit=$?"; tail -6 $L/$P-kernels.log
fi
a=$ATT-$PHI
train $a-short recall-small-short.toml --set run.steps=${STAGE1:-600}
train $a-s1024 recall-small-s1024.toml --set run.init_from=\"$R/$a-short\"
train $a-s4096 recall-small-s4096.toml --set run.init_from=\"$R/$a-s1024\"
(( $(left) > 250 || ${UPTO:-16384} == 4096 )) && ev $a-s4096 4096
[[ ${UPTO:-16384} == 4096 ]] && { wait; pack; exit 0; }
train $a-s8192 recall-small-s8192.toml --set run.init_from=\"$R/$a-s4096\"
(( $(left) > 200 )) && ev $a-s8192 8192
train $a-s16384 recall-small-s16384.toml --set run.init_from=\"$R/$a-s8192\"
(( $(left) > 12 )) && ev $a-s16384 16384
(( $(left) > 12 )) && ev $a-s16384 32768
wait
pack
