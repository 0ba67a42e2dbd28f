"""Ahead-of-time compilation of kd's Triton kernels for a GPU target, on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code that the real compiler rejects and says
nothing about registers. Here every kernel variant the launchers can produce is compiled for a target (default Hopper,
``GPUTarget("cuda", 90, 32)``) down to a cubin, and ptxas's verbose log of that compilation gives its resources.

- `scenarios()`: the launches of every divergence x TAID x CE weight x temperature x dtype x vocabulary (x teacher
  source for the fused kernel), built by the launchers' own helpers (`dense_kl.rows_launch` for the dense
  and the fused path, `launch_config` for CUDA) on meta tensors laid out as the trainer passes them: the
  shifted ``[B, L, V']`` logits cut to the shared vocabulary V; the fused kernel's ``[C, V]`` chunks come from
  `kd.ops.chunks.fused_linear_chunks` itself. A new constexpr or argument in a launcher shows up here
  without an edit.
- `variants()`: each launch specialized as Triton's runtime specializes it (its binder: constexprs, argument types,
  16-divisibility of pointers and integers), one per distinct compilation.
- `compile_variant()`: triton.compile for the target, then registers / spills / shared memory from ptxas's log, the
  widest vector global load in the PTX (128 bits: 8 bf16 per instruction; 0: one element per instruction) and the
  narrowest global load and store inside its loops (the block loops over the rows: 128 when all of them vectorize).

The vocabularies: 128256 (Llama 3, lm_head as wide), 151936 (Qwen2.5's lm_head rows) and 151665 (Qwen2.5's
``len(tokenizer)``, the V the trainer actually cuts to, inside 151936-wide logits: not a multiple of 16; for the fused
path also with a 151665-row lm_head). The kernels' block loops stay 128-bit vectorized for every one of them.

Needs Triton's NVIDIA backend (ptxas ships with it) and real JITFunctions, i.e. TRITON_INTERPRET unset before triton
is first imported: run it in its own process (tools/kernel_report.py; tests/kernels/test_sm90_compile.py).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from kd.ops import dense_kl, fused_linear_kl
from kd.ops.chunks import fused_linear_chunks
from kd.ops.spec import DivergenceSpec
from kd.ops import row_math as rm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VOCABS = ((128256, 128256), (151936, 151936), (151665, 151936))  # (shared vocabulary V, logits width V')
# The fused path also with an lm_head of exactly V rows (resized to len(tokenizer)): no rows to round up to, its
# chunks get padded rows all the same (kd.losses.chunked.ROW_ALIGN). The dense kernel reads the caller's V'-wide rows.
FUSED_VOCABS = VOCABS + ((151665, 151665),)
TAID_T = (None, 0.5)
TEMPERATURES = (1.0, 2.0)
CE_WEIGHTS = (0.0, 0.1)
TEACHERS = ("hidden", "logits")
# Meta tensors are free, but small shapes keep the enumeration fast; a shape reaches the compiler only through which
# integers are multiples of 16, and these match real runs: seq_len - 1 rows per sequence after the trainer's shift
# (odd, like 2047), the vocabulary widths above. One fused chunk per call (all chunks compile the same).
BATCH, SEQ_LEN, HIDDEN = 2, 130, 64


class Unavailable(RuntimeError):
    """The compiler toolchain for the target is missing (the message says what)."""


@dataclass
class Variant:
    """One distinct compilation: a representative launch, its specialization, and the scenarios that produce it."""

    kernel: str
    launch: dense_kl.Launch
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any
    scenarios: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> str:
        return next(t for t in self.signature.values() if t.startswith("*")).lstrip("*")

    @property
    def unaligned(self) -> list[str]:
        """Integer and pointer arguments not known to be multiples of 16 (no vectorized access through them)."""
        names = list(self.signature)
        specialized = {names[path[0]] for path, attr in self.attrs.items() if attr}
        return [n for n, t in self.signature.items() if (t.startswith("*") or t[0] in "iu") and n not in specialized]

    @property
    def name(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.launch.kwargs.items())
        return f"{self.kernel}[{flags}] {self.dtype}" + (f" unaligned:{'+'.join(self.unaligned)}"
                                                           if self.unaligned else "")


def kernel_name(kernel: Any) -> str:
    return getattr(kernel, "fn", kernel).__name__


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _dense_launches(spec: DivergenceSpec, dtype: torch.dtype, vocab: int, width: int,
                    ce_weight: float) -> list[dense_kl.Launch]:
    """The one-pass row kernel of `kd.ops.dense_loss` for the trainer's shifted, vocab-cut logits."""
    student = dense_kl._as_rows(_meta(BATCH, SEQ_LEN, width, dtype=dtype)[:, :-1, :vocab])
    teacher = dense_kl._as_rows(_meta(BATCH, SEQ_LEN, width, dtype=dtype)[:, :-1, :vocab])
    grad, _ = dense_kl.grad_buffer(student)
    mask = _meta(BATCH, SEQ_LEN - 1, dtype=torch.bool).reshape(-1)
    labels = _meta(BATCH, SEQ_LEN, dtype=torch.long)[:, 1:].reshape(-1)
    launch, _, _ = dense_kl.rows_launch(student, teacher, grad, mask, labels, spec, 1.0 - ce_weight, ce_weight,
                                        dense_kl.launch_config(torch.device("cuda")))
    return [launch]


def _fused_launches(spec: DivergenceSpec, dtype: torch.dtype, vocab: int, width: int, ce_weight: float,
                    teacher: str) -> list[dense_kl.Launch]:
    """The chunk launches of one `fused_linear_divergence` call (the real chunk loop, on meta tensors)."""
    launches = []
    config = dense_kl.launch_config(torch.device("cuda"))

    def step(logits, teacher_logits, mask, labels, spec, kd_weight, ce_weight):
        launch, kd, ce = dense_kl.rows_launch(logits, teacher_logits, logits, mask, labels, spec, kd_weight,
                                              ce_weight, config)
        launches.append(launch)
        return kd, ce

    rows = SEQ_LEN - 1
    source = (dict(teacher_logits=_meta(BATCH, SEQ_LEN, width, dtype=dtype)[:, :-1, :vocab], teacher_hidden=None,
                   teacher_weight=None) if teacher == "logits"
              else dict(teacher_logits=None, teacher_hidden=_meta(BATCH, rows, 2 * HIDDEN, dtype=dtype),
                        teacher_weight=_meta(width, 2 * HIDDEN, dtype=dtype)))
    fused_linear_chunks(
        _meta(BATCH, rows, HIDDEN, dtype=dtype), _meta(width, HIDDEN, dtype=dtype),
        _meta(BATCH, rows, dtype=torch.bool), _meta(BATCH, SEQ_LEN, dtype=torch.long)[:, 1:], **source, spec=spec,
        ce_weight=ce_weight, vocab_size=vocab, step=step,
        chunk_size=fused_linear_kl.default_chunk_rows(BATCH * rows, vocab))
    return launches


def scenarios() -> Iterator[tuple[str, dense_kl.Launch]]:
    """(scenario description, launch) for every launch the dense and fused-linear paths make (module docstring)."""
    for name in rm.CODES:
        for taid_t in TAID_T:
            for temperature in TEMPERATURES:
                spec = DivergenceSpec(name, temperature, 0.5, 0.1, taid_t)
                for dtype_name, dtype in DTYPES.items():
                    for vocab, width in FUSED_VOCABS:
                        what = f"{name} taid={taid_t} T={temperature} {dtype_name} V={vocab}/{width}"
                        for ce_weight in CE_WEIGHTS:
                            if (vocab, width) in VOCABS:
                                for launch in _dense_launches(spec, dtype, vocab, width, ce_weight):
                                    yield f"dense {what} ce={ce_weight}", launch
                            for teacher in TEACHERS:
                                for launch in _fused_launches(spec, dtype, vocab, width, ce_weight, teacher):
                                    yield f"fused {what} ce={ce_weight} teacher={teacher}", launch


def toolchain(arch: int = 90, ptxas: str = "triton") -> str:
    """The ptxas that compiles for ``arch`` (path and version); raises `Unavailable` when Triton's NVIDIA backend
    lacks it.

    ``ptxas``: "triton", the one this Triton picks (3.9: its bundled CUDA 13 ``ptxas-blackwell`` from sm_90 on); or
    "cuda12", its bundled CUDA 12 ``ptxas``, which Triton <= 3.7 uses for sm_90 (e.g. 3.6 on the GPU machines). The
    choice holds for the whole process (an environment variable; Triton caches the ptxas version that picks the PTX
    version): make it before compiling anything.
    """
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
        # compile_variant needs these (AttributeError in a Triton without them): ptxas's log, uncached compiles,
        # the bundled cuobjdump
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.nvidia.cuobjdump.path
        if ptxas == "cuda12":
            os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = knobs.nvidia.ptxas.path
        elif ptxas != "triton":
            raise ValueError(f"ptxas must be 'triton' or 'cuda12', got {ptxas!r}")
        path = get_ptxas(arch).path
        version = subprocess.run([path, "--version"], check=True, capture_output=True, text=True).stdout
    except (ImportError, AttributeError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise Unavailable(f"Triton's NVIDIA backend or its ptxas is missing ({type(e).__name__}: {e})") from e
    release = [line for line in version.splitlines() if "release" in line] or version.strip().splitlines()[-1:]
    return f"{path} ({release[0].strip()})"


def variants(arch: int = 90) -> list[Variant]:
    """One `Variant` per distinct compilation of the launches of `scenarios()`, in first-seen order."""
    try:  # the runtime's own specialization: internal API (written against Triton 3.9)
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        JITFunction._pack_args
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"this Triton specializes launches differently ({type(e).__name__}: {e})") from e

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: dict[str, Any] = {}
    found: dict[str, Variant] = {}
    for what, launch in scenarios():
        fn = launch.kernel
        if not isinstance(fn, JITFunction):
            raise Unavailable(f"{kernel_name(fn)} is a {type(fn).__name__}, not a JITFunction: TRITON_INTERPRET "
                              "must be unset before triton is imported")
        name = kernel_name(fn)
        if name not in binders:
            binders[name] = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = {**launch.kwargs, "debug": fn.debug or knobs.runtime.debug}  # as JITFunction.run
        bound, specialization, options = binders[name](*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        key = f"{name} {specialization} {options}"
        if key not in found:
            found[key] = Variant(name, launch, signature, constexprs, attrs, options)
        found[key].scenarios.append(what)
    return list(found.values())


def representative(all_variants: list[Variant]) -> list[Variant]:
    """A small subset where every kernel shows each value of each constexpr, each combination of the constexprs
    besides DIV (TAID x CE x ...), each dtype and each alignment class at least once (greedy set cover: the variant
    adding the most unseen features first)."""
    def features(v: Variant) -> set:
        flags = tuple(sorted((k, x) for k, x in v.launch.kwargs.items() if k != "DIV"))
        return ({(v.kernel, key, value) for key, value in v.launch.kwargs.items()} | {
            (v.kernel, "flags", flags), (v.kernel, "dtype", v.dtype), (v.kernel, "unaligned", tuple(v.unaligned))})

    todo = set().union(*(features(v) for v in all_variants))
    chosen = []
    while todo:
        best = max(all_variants, key=lambda v: len(features(v) & todo))
        chosen.append(best)
        todo -= features(best)
    return chosen


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\b[^;]*?\b0x([0-9a-f]+)")  # "BRA 0x1b90", "@!P0 BRA P2, 0x70e0", "BRA.U ..."


def local_memory_in_loops(sass: str) -> int:
    """Local-memory instructions (LDL/STL: register spills) inside a loop of ``cuobjdump -sass`` text, a loop being
    the span from a backward branch's target to the branch. A spill outside every loop runs once per program (row)."""
    insts = [(int(addr, 16), text) for addr, text in _SASS.findall(sass)]
    loops = [(int(m.group(1), 16), addr) for addr, text in insts
             if (m := _BRANCH.search(text)) and int(m.group(1), 16) <= addr]
    return sum(1 for addr, text in insts if re.search(r"\b(LDL|STL)\b", text)
               and any(lo <= addr <= hi for lo, hi in loops))


def sass(cubin: bytes) -> str:
    """The cubin disassembled by the cuobjdump bundled with Triton."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


_PTXAS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame", "smem": r"(\d+) bytes smem"}
# a global load or store and its width: "ld.global.v4.b32", "@%p3 ld.global.b16", "st.global.L1::evict_first.v2.b32"
_ACCESS = re.compile(r"\b(ld|st)\.global\S*?(?:\.v(\d))?\.[bfsu](\d+)\s")
# the first line of a basic block in LLVM's PTX: a branch target's label or a fall-through block's comment
_PTX_BLOCK = re.compile(r"^(?:\$L__BB\w+:|// %bb\.\d+:)")


def parse_ptxas_log(log: str) -> dict:
    """Resources of the one kernel in a ``ptxas -v`` log (missing numbers are 0: ptxas omits zero smem)."""
    if "Used" not in log:
        raise RuntimeError(f"no register count in ptxas's log:\n{log}")
    return {k: int(m.group(1)) if (m := re.search(p, log)) else 0 for k, p in _PTXAS.items()}


def vector_load_bits(ptx: str) -> int:
    """Bits moved by the widest vector ld.global of the PTX (e.g. v4.b32: 128); 0 when every global load is scalar
    (the logit rows are then read one element per instruction: their base or V is not known to be 16-aligned)."""
    return max((int(n) * int(bits) for op, n, bits in _ACCESS.findall(ptx) if op == "ld" and n), default=0)


def loop_access_bits(ptx: str) -> dict:
    """The narrowest global load and store inside a loop of the PTX, in bits per instruction (v4.b32: 128, a scalar
    bf16: 16; None where the loops have none).

    The loops are the block loops over the logit rows, where the bytes move: a row's partial last block (scalar,
    masked) and the per-row scalars run outside them. 128 means every block of every pass moves 16 bytes per
    instruction; a narrower width there is the regression `vector_load_bits` alone would not show. The loops are
    found from LLVM's block comments in the PTX (its verbose assembly, as Triton emits it)."""
    widths: dict[str, list[int]] = {"ld": [], "st": []}
    lines = ptx.splitlines()
    in_loop = False
    for i, line in enumerate(lines):
        if _PTX_BLOCK.match(line.strip()):
            # LLVM marks each block of a loop on its first lines ("=>This Inner Loop Header", "in Loop: Header=");
            # a loop's blocks need not be contiguous in the text (rotated loops), so its span cannot be used
            head = line + (lines[i + 1] if i + 1 < len(lines) else "")
            in_loop = "Loop Header" in head or "in Loop:" in head
        elif in_loop:
            for op, n, bits in _ACCESS.findall(line + " "):
                widths[op].append(int(n or 1) * int(bits))
    return {"loop_ld_bits": min(widths["ld"], default=None), "loop_st_bits": min(widths["st"], default=None)}


def _chain(error: BaseException) -> str:
    """The messages of an exception and its causes, the root cause first (Triton wraps it in source excerpts)."""
    messages = []
    while error is not None and len(messages) < 8:
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(reversed(messages))


def compile_variant(variant: Variant, arch: int = 90) -> dict:
    """Compile for ``GPUTarget("cuda", arch, 32)``; the resources of the cubin, or ``error`` when it fails.

    Always a fresh compilation (a cache hit would skip ptxas, whose log is read from Triton's own call)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = variant.launch.kernel
    out = {"name": variant.name, "kernel": variant.kernel, "dtype": variant.dtype, "unaligned": variant.unaligned,
           "constexprs": dict(variant.launch.kwargs), "scenarios": len(variant.scenarios)}
    log = io.StringIO()
    start = time.perf_counter()
    with knobs.compilation.scope(), knobs.nvidia.scope(), knobs.cache.scope(), tempfile.TemporaryDirectory() as tmp:
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        knobs.cache.dir = tmp
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn, variant.signature, variant.constexprs, variant.attrs),
                                          target=GPUTarget("cuda", arch, 32), options=variant.options.__dict__)
        except Exception as e:  # the compiler's own message is the finding
            return {**out, "error": _chain(e)[:4000]}
    out["compile_s"] = round(time.perf_counter() - start, 3)
    out["cubin_bytes"] = len(compiled.asm.get("cubin", b""))
    out["num_warps"] = compiled.metadata.num_warps
    out["shared"] = compiled.metadata.shared  # dynamic shared memory Triton allocates (bytes per program)
    out.update(parse_ptxas_log(log.getvalue()))
    out["vector_load_bits"] = vector_load_bits(compiled.asm["ptx"])
    out.update(loop_access_bits(compiled.asm["ptx"]))
    out["local_in_loops"] = (local_memory_in_loops(sass(compiled.asm["cubin"]))
                             if out["spill_stores"] or out["spill_loads"] or out["stack"] else 0)
    return out
