#!/usr/bin/env python3
"""Summarise a Chrome trace written by `nsa-train train --profile A..B`.

Usage: python3 scripts/trace_summary.py RUN_DIR/trace-steps-A-B.json [LABEL]
                                         [--kernel REGEX] [--top N]

Prints the GPU kernel time of the profiled steps by kind (the project's NVRTC kernels by
name, GEMMs, flash/cuDNN attention, elementwise, reductions, sorts, copies), the top kernels,
and the kernel time by the CPU op that launched it: its outermost op (e.g. an autograd
function in backward) and the launching op with its input shapes. Kernels launched through
the CUDA driver (the NVRTC kernels) have no launching op and show as "?".

--kernel REGEX (case-insensitive) adds a section for the kernels whose name matches: their time
by the whole chain of CPU ops above the launch (outermost first) and the launching op's input
shapes, which says where scattered kernels such as copies come from. --top N: rows per
section (default 30).
"""
import argparse
import collections
import json
import re
import sys


def kind(name):
    n = name.lower()
    if n.startswith("nsa_"):
        return "nsa kernels: " + re.sub(r"_dk\d+.*|_bf16.*|_f32.*", "", name)
    if "cudnn" in n or "fmha" in n or "sdpa" in n:
        return "cudnn attention"
    if "flash" in n:
        return "flash attention"
    if "gemm" in n or "nvjet" in n or "xmma" in n or "cutlass" in n:
        return "gemm"
    if "sort" in n or "radix" in n or "scan" in n:
        return "sort/scan"
    if "reduce" in n:
        return "reduce"
    if "elementwise" in n:
        return "elementwise"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    return "other"


def main():
    ap = argparse.ArgumentParser(description="Summarise a Chrome trace of nsa-train --profile.")
    ap.add_argument("trace")
    ap.add_argument("label", nargs="?")
    ap.add_argument("--kernel", help="regex: these kernels' time by their whole CPU op chain")
    ap.add_argument("--top", type=int, default=30, help="rows per section")
    a = ap.parse_args()
    path, label, top_n = a.trace, a.label or a.trace, max(a.top, 1)
    try:
        wanted = re.compile(a.kernel, re.IGNORECASE) if a.kernel else None
    except re.error as e:
        sys.exit(f"--kernel {a.kernel!r}: not a regular expression ({e})")
    try:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"{path}: not a readable Chrome trace with traceEvents ({e})")
    # Nest the CPU ops of each thread by time to find each op's outermost and parent op.
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            by_thread[e["tid"]].append(e)
    op_of = {}
    for ops in by_thread.values():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in ops:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            e["_top"] = stack[0]["name"] if stack else e["name"]
            e["_parent"] = stack[-1]["name"] if stack else ""
            e["_chain"] = " > ".join([o["name"][:40] for o in stack] + [e["name"][:40]])
            stack.append(e)
            ext = e.get("args", {}).get("External id")
            if ext is not None:
                op_of[ext] = e
    by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    by_top, by_op, op_count = collections.Counter(), collections.Counter(), collections.Counter()
    by_chain, chain_count = collections.Counter(), collections.Counter()
    total = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        d = float(e.get("dur", 0.0))
        total += d
        name = e.get("name", "?")
        by_kind[kind(name)] += d
        by_name[name] += d
        count[name] += 1
        op = op_of.get(e.get("args", {}).get("External id"))
        if op is None:
            top, key = "?", ("?", "", name[:40], "")
        else:
            dims = str(op.get("args", {}).get("Input Dims", ""))[:70]
            top = op["_top"][:70]
            key = (op["_top"][:60], op["_parent"][:30], op["name"], dims)
        by_top[top] += d
        by_op[key] += d
        op_count[key] += 1
        if wanted is not None and wanted.search(name):
            chain = ("?", name[:60]) if op is None else (op["_chain"], key[3])
            by_chain[chain] += d
            chain_count[chain] += 1
    print(f"== {label}: {total / 1e3:.1f} ms of GPU kernels, {sum(count.values())} launches")
    for k, v in by_kind.most_common():
        print(f"  {v / 1e3:9.2f} ms {100 * v / max(total, 1e-9):5.1f} %  {k}")
    print("-- top kernels")
    for k, v in by_name.most_common(top_n):
        print(f"  {v / 1e3:9.2f} ms x{count[k]:5d}  {k[:110]}")
    print("-- by outermost op")
    for k, v in by_top.most_common(top_n):
        print(f"  {v / 1e3:9.2f} ms  {k}")
    print("-- by (outermost op, parent, launching op, input dims)")
    for k, v in by_op.most_common(top_n):
        print(f"  {v / 1e3:9.2f} ms x{op_count[k]:4d}  {' | '.join(k)}")
    if wanted is not None:
        matched = sum(by_chain.values())
        print(f"-- kernels matching {a.kernel!r}: {matched / 1e3:.2f} ms, by CPU op chain | input dims")
        for k, v in by_chain.most_common(top_n):
            print(f"  {v / 1e3:9.2f} ms x{chain_count[k]:4d}  {' | '.join(k)}")


if __name__ == "__main__":
    main()
