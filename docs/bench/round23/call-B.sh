#!/bin/bash
# Session 34, call B, right after A on the same machine: the candidate's whole GPU check, its
# decode sweep over every cached length, and 125m generation after a 32k prompt, main and the
# candidate. The candidate: `all` if its decode checks passed in A, else `pdl`, else none.
set -u
T=/opt/torch/.venv/lib/python3.12/site-packages/torch; export LD_LIBRARY_PATH=$T/lib
P=B; V=/tmp/variants; A=/tmp/r34/logs; L=/tmp/r34/logsB; mkdir -p $V $L ~/.cache/nsa/kernels
S0=$(date +%s); say() { echo "$* t=$(( $(date +%s) - S0 ))"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $L/$P-device.txt
if [ ! -x $V/nsa-main ]; then tar xzf .gpu34/variants.tgz -C $V && cp -r $V/kcache/. ~/.cache/nsa/kernels/; fi
pack() { tar czf $OUT/$P-logs.tgz -C $L . ; }
C=${C:-}
if [ -z "$C" ]; then for v in all pdl; do grep -q "GPU checks passed" $A/A-check-$v.log 2>/dev/null && { C=$v; break; }; done; fi
C=${C:-all}; echo "candidate $C" | tee $L/$P-candidate.txt
timeout 230 $V/nsa-$C check --gpu > $L/$P-check-$C.log 2>&1; say "check $C rc=$?"; tail -1 $L/$P-check-$C.log
grep -hiE "\| fail" $L/$P-check-*.log | head; pack
timeout 170 $V/nsa-$C bench decode --device cuda --shape paper,125m --batch 1,8 --repeats 10 --preset none > $L/$P-sweep-$C.log 2>&1; say "sweep $C rc=$?"; pack
for v in main $C; do
  [ $(( $(date +%s) - S0 )) -lt 500 ] || break
  timeout 60 $V/nsa-$v bench decode --device cuda --seq 8192 --batch 1 --repeats 1 --preset 125m --prompt 32768 --new-tokens 64 > $L/$P-gen-$v.log 2>&1; say "gen $v rc=$?"
done; pack
grep -E "^\| (paper|125m) \|" $L/$P-sweep-$C.log | awk -F'|' '{print $2,$3,$4,"graph",$8,"dense",$10}' | sort -u
for v in main $C; do grep -hE "^\| 125m \| (nsa|dense) " $L/$P-gen-$v.log 2>/dev/null | sort -u; done
