#!/usr/bin/env python3
"""Stages versions of the selection kernel for the timing harness (harness.cu, run.sh).

usage: prepare.py OUT_DIR NAME=REV [NAME=REV ...]

REV is a git revision, or `worktree` for the files as they are. For each NAME, OUT_DIR/NAME/
receives that revision's nsa-sys/kernels/*.cuh and its compressed.cu with every kernel
instantiation removed except the bf16 selection kernels at dk 64 and 192 (4 and 8 warps), so
that nvcc compiles only what the harness launches. Run it on the CPU machine (it needs git);
carry OUT_DIR to the GPU machine and run run.sh there.
"""
import pathlib
import re
import subprocess
import sys

KEEP = {"nsa_cmp_select_bf16_dk64", "nsa_cmp_select_bf16_dk192",
        "nsa_cmp_select_bf16_dk64_w8", "nsa_cmp_select_bf16_dk192_w8"}
ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = "nsa-sys/kernels"


def read(rev, path):
    if rev == "worktree":
        return (ROOT / path).read_text()
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def headers(rev):
    if rev == "worktree":
        return sorted(p.name for p in (ROOT / KERNELS).glob("*.cuh"))
    out = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:{KERNELS}"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(n for n in out.split() if n.endswith(".cuh"))


def prune(src):
    lines = []
    for line in src.splitlines(keepends=True):
        m = re.match(r"(NSA_CMP_MMA|NSA_CMP_FOLD|NSA_CMP_SELECT)\((\w+)?", line)
        if m and not (m.group(1) == "NSA_CMP_SELECT" and m.group(2) in KEEP):
            continue
        lines.append(line)
    return "".join(lines)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = pathlib.Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, _, rev = spec.partition("=")
        if not name or not rev:
            sys.exit(f"expected NAME=REV, got {spec!r}")
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for h in headers(rev):
            (d / h).write_text(read(rev, f"{KERNELS}/{h}"))
        (d / "compressed.cu").write_text(prune(read(rev, f"{KERNELS}/compressed.cu")))
        print(f"{d}: {rev}")


if __name__ == "__main__":
    main()
