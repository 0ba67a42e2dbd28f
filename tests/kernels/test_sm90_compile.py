"""kd's Triton kernels compile for Hopper (sm_90) without a GPU, and none spills registers inside a loop.

The other kernel tests run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), which accepts code
the real compiler rejects and says nothing about registers. Here tools/kernel_report.py compiles the kernels for
GPUTarget("cuda", 90, 32) with Triton's NVIDIA backend (its bundled ptxas; no driver, no GPU) in a process of its own,
since in this one the kernels are already interpreter functions. The variants come from kd.ops.aot, which builds them
with the launchers' own helpers; the default suite compiles a representative subset (every constexpr value, dtype and
alignment class of each kernel, 24 compilations, ~15 s), `-m slow` all of them (360, ~3 minutes on 2 cores).
Besides compiling, every variant must keep its loads and stores 128-bit vectorized in the block loops, also for a
vocabulary that is not a multiple of 16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kd.ops import aot  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "kernel_report.py"
KERNELS = {"_rows_kernel"}  # the one-pass row kernel of both the dense and the fused-linear path
# Divergence codes of the kernels, and the ones whose loss needs the final normalizers (a second pass, SCALAR_PASS).
CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_kl": 4, "skew_reverse_kl": 5}
TWO_PASS = {"jsd", "tvd", "skew_kl", "skew_reverse_kl"}
# 8 warps x 32 threads: above 128 registers only one program fits an SM's 64K registers, too few warps to hide HBM
# latency in a streaming kernel.
MAX_REGISTERS = 128


def run_report(tmp_path: Path, *flags: str, timeout: int) -> list[dict]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-W", "ignore", str(TOOL), "--json", str(out), *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        pytest.fail(f"kernel_report wrote no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(out.read_text())
    if "unavailable" in data:
        pytest.skip(f"cannot compile for sm_90 here: {data['unavailable']}")
    return data["rows"]


def check_rows(rows: list[dict]) -> None:
    failed = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "failed to compile for sm_90:\n" + "\n".join(failed)
    assert all(r["cubin_bytes"] > 0 for r in rows)
    looped = [f"{r['name']}: {r['local_in_loops']} spill instructions in loops" for r in rows if r["local_in_loops"]]
    assert not looped, "\n".join(looped)
    heavy = [f"{r['name']}: {r['registers']}" for r in rows if r["registers"] > MAX_REGISTERS]
    assert not heavy, "too many registers per thread:\n" + "\n".join(heavy)
    assert all(r["num_warps"] == r["constexprs"]["num_warps"] for r in rows)
    # Every block loop over the rows moves 16 bytes per load / store instruction, whatever V (only a row's partial
    # last block, outside the loops, is scalar); the backward kernel's loop stores, the fused kernel's too (in place).
    narrow = [f"{r['name']}: loads {r['loop_ld_bits']}, stores {r['loop_st_bits']} bits" for r in rows
              if r["loop_ld_bits"] != 128 or r["loop_st_bits"] != 128]
    assert not narrow, "block loops not 128-bit vectorized:\n" + "\n".join(narrow)
    # No row base the launchers pass is unaligned: the trainer's logits are V'-wide (V' a multiple of 16), the fused
    # chunks and the dense gradient are allocated with padded rows. L (rows per sequence) never scales an address alone.
    strides = [f"{r['name']}" for r in rows if set(r["unaligned"]) - {"V", "s_l", "t_l", "g_l"}]
    assert not strides, "row strides not known to be multiples of 16:\n" + "\n".join(strides)


def test_parse_ptxas_log():
    log = ("ptxas info    : 11 bytes gmem\n"
           "ptxas info    : Compiling entry function '_fused_chunk_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _fused_chunk_kernel\n"
           "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size\n")
    assert aot.parse_ptxas_log(log) == {"registers": 64, "spill_stores": 12, "spill_loads": 4, "stack": 8, "smem": 0}
    with pytest.raises(RuntimeError, match="no register count"):
        aot.parse_ptxas_log("ptxas fatal   : Unsupported .version 9.4")


def test_spills_inside_loops_are_told_apart_from_one_off_spills():
    def sass(lines):
        return "\n".join(f"        /*{addr:04x}*/                   {text} ;      /* 0x0000000401007387 */"
                         for addr, text in lines)

    once = [(0x160, "STL.64 [R1], R4"), (0x180, "@!P0 BRA 0x5d30"), (0x1b90, "FADD R16, R19, R16"),
            (0x4390, "@P2 BRA 0x1b90"), (0x43a0, "LDL.LU.64 R56, [R1]"), (0x5d30, "EXIT")]
    assert aot.local_memory_in_loops(sass(once)) == 0  # the forward branch to 0x5d30 is no loop
    looped = [(0x240, "@!P0 BRA P2, 0x70e0"), (0x4ad0, "STL [R1], R36"), (0x4b40, "FMUL R2, R26, R27"),
              (0x4b50, "LDL R74, [R1]"), (0x7040, "@P5 BRA 0x4b40"), (0x70e0, "STL [R1+0x4], RZ")]
    assert aot.local_memory_in_loops(sass(looped)) == 1


def test_vector_load_width_from_ptx():
    aligned = "ld.global.b8 { %rs1 }, [ %rd1 + 0 ];\n@%p2 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd5 + 0 ];"
    scalar = "@%p3 ld.global.b16 { %rs2 }, [ %rd6 + 0 ];\nld.global.b64 { %rd9 }, [ %rd8 + 0 ];"
    assert aot.vector_load_bits(aligned) == 128
    assert aot.vector_load_bits(scalar) == 0


def test_loop_access_width_from_ptx():
    """Loads and stores inside LLVM's loops (marked by its block comments, blocks possibly out of order) count;
    the ones outside (per-row scalars, a row's masked last block) do not."""
    ptx = """
// %bb.0:
\tld.global.b8 { %rs1 }, [ %rd25 + 0 ];
$L__BB0_48:                             // %exit
                                        //   in Loop: Header=BB0_32 Depth=1
\tst.global.v4.b32 [ %rd89 + 0 ], { %r1, %r2, %r3, %r4 };
$L__BB0_32:                             // %body
                                        // =>This Inner Loop Header: Depth=1
\tld.global.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd5 + 0 ];
\t@%p3 bra \t$L__BB0_48;
// %bb.33:
\t@%p4 ld.global.b16 { %rs2 }, [ %rd6 + 0 ];
\tst.global.b16 [ %rd7 + 0 ], { %rs2 };
"""
    assert aot.loop_access_bits(ptx) == {"loop_ld_bits": 128, "loop_st_bits": 128}
    scalar_in_loop = ptx.replace("// %bb.33:", "// %bb.33:                  //   in Loop: Header=BB0_32 Depth=1")
    assert aot.loop_access_bits(scalar_in_loop) == {"loop_ld_bits": 16, "loop_st_bits": 16}
    assert aot.loop_access_bits("// %bb.0:\n\tld.global.b32 { %r1 }, [ %rd1 + 0 ];\n") == {
        "loop_ld_bits": None, "loop_st_bits": None}
    assert aot.vector_load_bits(ptx) == 128


def test_launches_cover_every_constexpr_combination():
    """The variants come from the launchers; here they are checked against the combinations the recipe options
    imply, written out independently: every divergence x TAID (x CE off / CE at T = 1 / CE at T != 1 for the fused
    kernel), each with the GPU launch configuration (not the interpreter's)."""
    seen: dict[str, list[dict]] = {k: [] for k in KERNELS}
    for _, launch in aot.scenarios():
        kw = launch.kwargs
        assert "num_warps" in kw and kw["BLOCK"] >= 1024 and kw["BLOCK"] & (kw["BLOCK"] - 1) == 0, kw
        seen[aot.kernel_name(launch.kernel)].append(kw)

    def project(kernel, *names):
        return {tuple(kw[n] for n in names) for kw in seen[kernel]}

    assert project("_rows_kernel", "DIV", "TAID", "SCALAR_PASS", "CE", "CE_SEPARATE", "GRAD_REVERSE") == {
        (c, taid, name in TWO_PASS, ce, ce_sep, name not in TWO_PASS)
        for name, c in CODES.items() for taid in (False, True)
        for ce, ce_sep in ((False, False), (True, False), (True, True))}
    launch = {"BLOCK", "num_warps"}  # nothing else is passed: a new constexpr must be added to the checks above
    assert {frozenset(kw) for kw in seen["_rows_kernel"]} == {
        frozenset({"DIV", "TAID", "SCALAR_PASS", "CE", "CE_SEPARATE", "GRAD_REVERSE"} | launch)}


@pytest.mark.integration
def test_representative_variants_compile_for_sm90(tmp_path):
    rows = run_report(tmp_path, timeout=600)
    check_rows(rows)
    assert {r["kernel"] for r in rows} == KERNELS
    for kernel in KERNELS:
        mine = [r for r in rows if r["kernel"] == kernel]
        assert {r["constexprs"]["DIV"] for r in mine} == set(CODES.values()), kernel
        assert {r["constexprs"]["TAID"] for r in mine} == {False, True}, kernel
        assert {r["dtype"] for r in mine} == {"bf16", "fp16", "fp32"}, kernel
        # V = 128256 / 151936 are multiples of 16, Qwen2.5's len(tokenizer) = 151665 is not
        assert {"V" in r["unaligned"] for r in mine} == {False, True}, kernel
    fused = [r["constexprs"] for r in rows if r["kernel"] == "_rows_kernel"]
    assert {(c["CE"], c["CE_SEPARATE"]) for c in fused} == {(False, False), (True, False), (True, True)}
    # Qwen2.5's V = 151665: 128-bit loads in every kernel (before the full blocks ran unmasked and the fused chunks
    # got padded rows, all its loads were scalar: vector_load_bits 0)
    odd = [r for r in rows if "V" in r["unaligned"]]
    assert {r["kernel"] for r in odd} == KERNELS
    assert all(r["vector_load_bits"] == 128 and r["loop_ld_bits"] == 128 for r in odd), [r["name"] for r in odd]


@pytest.mark.slow
@pytest.mark.integration
def test_every_variant_compiles_for_sm90(tmp_path):
    rows = run_report(tmp_path, "--all", timeout=1800)
    check_rows(rows)
    assert len(rows) == len({r["name"] for r in rows}) >= 200  # one row kernel for dense and fused: 216 on Triton 3.9
