"""Compile kd's Triton kernels for a GPU (default Hopper, sm_90) on any machine and print each variant's resources.

Every (kernel, constexprs, dtype, alignment) the launchers produce (kd.ops.aot) is compiled to a cubin. Columns:
registers per thread; bytes spilled (ptxas -v); spill instructions inside a loop of the SASS (``in_loop``: the ones
that cost bandwidth; a spill outside every loop runs once per row); Triton's shared memory per program; the widest
vector global load in bits (0: the logits are read one element per instruction); the narrowest global load and store
inside a loop, in bits (``loop_ld`` / ``loop_st``: 128 when every full block of the rows moves 16 bytes per
instruction, 16 or 32 when a loop reads one element per instruction; ``-``: no such access in a loop); compile
seconds. Exit status 1 if a variant fails to compile or spills inside a loop.

    python tools/kernel_report.py                     # a representative subset (24 variants, ~15 s)
    python tools/kernel_report.py --all --json k.json # every variant (a few minutes on 2 cores)
    python tools/kernel_report.py --ptxas cuda12      # with the ptxas Triton <= 3.7 uses for sm_90
    python tools/kernel_report.py --arch 100          # another target (Blackwell)

TRITON_INTERPRET is dropped here before triton is imported: the kernels must be real JITFunctions. No GPU needed;
Triton's NVIDIA backend (with its bundled ptxas and cuobjdump) is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the kernels must be real JITFunctions
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.ops import aot  # noqa: E402

COLUMNS = ("registers", "spill_stores", "spill_loads", "local_in_loops", "shared", "vector_load_bits", "loop_ld_bits",
           "loop_st_bits", "compile_s")
HEADER = ("regs", "spill_st", "spill_ld", "in_loop", "smem", "vec_ld", "loop_ld", "loop_st", "secs")


def _cell(value) -> str:
    return "-" if value is None else str(value)


def report(rows: list[dict]) -> str:
    lines = [f"{'kernel variant':<112} " + " ".join(f"{h:>8}" for h in HEADER)]
    for r in rows:
        values = (("FAILED: " + r["error"].splitlines()[0],) if "error" in r
                  else tuple(f"{_cell(r[c]):>8}" for c in COLUMNS))
        lines.append(f"{r['name']:<112} " + " ".join(values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every variant, not the representative subset")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90: H100/H200)")
    parser.add_argument("--ptxas", choices=("triton", "cuda12"), default="triton",
                        help="triton: the ptxas this Triton uses for the target; cuda12: Triton's bundled CUDA 12 "
                             "ptxas, the one Triton <= 3.7 uses for sm_90")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (and any error) as JSON here")
    args = parser.parse_args(argv)
    try:
        ptxas = aot.toolchain(args.arch, args.ptxas)
        found = aot.variants(args.arch)
    except aot.Unavailable as e:
        if args.json:
            args.json.write_text(json.dumps({"unavailable": str(e)}))
        print(f"unavailable: {e}")
        return 3
    chosen = found if args.all else aot.representative(found)
    print(f"{len(found)} distinct compilations from the launchers; compiling {len(chosen)} for sm_{args.arch} "
          f"with {ptxas}")
    rows = []
    for variant in chosen:
        rows.append(aot.compile_variant(variant, args.arch))
        print(report(rows[-1:]).splitlines()[1], flush=True)
    bad = [r for r in rows if "error" in r or r["local_in_loops"]]
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "ptxas": ptxas, "distinct": len(found), "rows": rows},
                                        indent=1))
    once = sum(1 for r in rows if "error" not in r and r["spill_stores"] and not r["local_in_loops"])
    print(f"{len(rows) - len(bad)}/{len(rows)} compiled with no spill inside a loop "
          f"({once} spill a few bytes once per row, outside the loops)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
