"""tools/export_hf.py (kd.export) and tools/plot_run.py.

Export: a real 1-process DeepSpeed engine (gloo, CPU) trains a tiny wrapped student one step and saves checkpoints
at ZeRO stages 0, 2 and 3 in kd's layout (tag, kd_meta, manifest, `latest`; in a subprocess, so its process group
never leaks into other tests); the export must give a model whose logits equal those of the live engine's student.
"Newest" and the unpickling allowlist are those of resume (kd.checkpoint.find_latest, kd.engine.safe_load).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
TOOLS = REPO / "tools"

BUILD_CHECKPOINTS = textwrap.dedent(r"""
    import json, os, random, socket, sys
    import numpy as np, torch, deepspeed
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    root = sys.argv[1]
    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    vocab = {f"w{i}": i for i in range(255)} | {"[UNK]": 255}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")

    class Wrapper(torch.nn.Module):
        # kd's trained module: the student under `.student`, loss parameters beside it (not exported).
        def __init__(self):
            super().__init__()
            self.student = AutoModelForCausalLM.from_config(config)
            self.loss = torch.nn.Linear(4, 4)

        def forward(self, ids):
            return self.student(input_ids=ids, labels=ids).loss + 0.0 * self.loss.weight.sum()

    probe = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    for stage in (0, 2, 3):
        torch.manual_seed(stage)
        module = Wrapper()
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config)
        for _ in range(2):  # train, so an export of the initial weights would not pass
            loss = engine(torch.randint(0, 256, (2, 12)))
            engine.backward(loss)
            engine.step()
        ckpt = os.path.join(root, f"stage{stage}")
        client = {"step": 2, "rng": {"numpy": np.random.get_state(), "python": random.getstate(),
                                     "torch": torch.get_rng_state()}}
        engine.save_checkpoint(ckpt, tag="step_00000002", client_state=client)  # also writes `latest`
        tag_dir = os.path.join(ckpt, "step_00000002")
        config.save_pretrained(os.path.join(tag_dir, "kd_meta"))
        tokenizer.save_pretrained(os.path.join(tag_dir, "kd_meta"))
        files = {os.path.relpath(os.path.join(d, n), tag_dir): os.path.getsize(os.path.join(d, n))
                 for d, _, names in os.walk(tag_dir) for n in names}
        with open(os.path.join(tag_dir, "kd_manifest.json"), "w") as f:  # kd's mark of a complete tag
            json.dump({"files": files}, f)
        with torch.no_grad():
            logits = engine.module.student(input_ids=probe).logits.float()
        torch.save({"probe": probe, "logits": logits}, os.path.join(ckpt, "reference.pt"))
""")


def _write_manifest(tag_dir: Path) -> None:
    """kd's manifest (kd.checkpoint): every file of the tag with its size; marks the tag complete."""
    files = {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in tag_dir.rglob("*")
             if p.is_file() and p.name != "kd_manifest.json"}
    (tag_dir / "kd_manifest.json").write_text(json.dumps({"files": files}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpts")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", BUILD_CHECKPOINTS, str(root)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_reproduces_student_logits(checkpoints, tmp_path, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.export import export_checkpoint

    ckpt = checkpoints / f"stage{stage}"
    out = Path(export_checkpoint(str(ckpt), str(tmp_path / "hf")))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".hf.tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = torch.load(ckpt / "reference.pt")
    with torch.no_grad():
        logits = model(input_ids=ref["probe"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert not any(k.startswith("loss") for k in model.state_dict())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w3 w7")["input_ids"] == [3, 7]


def test_export_bf16_casts_weights(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from kd.export import export_checkpoint

    fp32 = AutoModelForCausalLM.from_pretrained(export_checkpoint(str(checkpoints / "stage2"), str(tmp_path / "a")))
    bf16 = AutoModelForCausalLM.from_pretrained(export_checkpoint(str(checkpoints / "stage2"), str(tmp_path / "b"),
                                                                  dtype="bf16"))
    assert bf16.dtype == torch.bfloat16
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    for (name, a), (_, b) in zip(fp32.state_dict().items(), bf16.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_export_refuses_mismatched_config(checkpoints, tmp_path):
    from transformers import LlamaConfig

    from kd.errors import UserError
    from kd.export import export_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints / "stage0", ckpt)
    meta = ckpt / "step_00000002" / "kd_meta"
    cfg = LlamaConfig.from_pretrained(meta)
    cfg.num_hidden_layers = 3
    cfg.save_pretrained(meta)
    _write_manifest(meta.parent)
    with pytest.raises(UserError, match="does not match"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_skips_a_latest_that_names_an_incomplete_tag(checkpoints, tmp_path, capsys):
    # `latest` names step 4, whose save never finished (no manifest): export takes step 2, as resume and kd eval do
    from kd.export import export_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints / "stage0", ckpt)
    shutil.copytree(ckpt / "step_00000002", ckpt / "step_00000004")
    (ckpt / "step_00000004" / "kd_manifest.json").unlink()
    (ckpt / "latest").write_text("step_00000004")
    out = Path(export_checkpoint(str(ckpt), str(tmp_path / "hf")))
    assert json.loads((out / "kd_export.json").read_text())["tag"] == "step_00000002"
    assert "skipping checkpoint step_00000004: no manifest" in capsys.readouterr().err


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("stage", [0, 2])
def test_export_refuses_pickled_code_with_the_resume_message(checkpoints, tmp_path, stage):
    # ZeRO-0 is read by kd itself, ZeRO-2 by DeepSpeed's zero_to_fp32 (weights_only=False): both must refuse first
    from kd.engine.safe_load import safe_load
    from kd.errors import UserError
    from kd.export import export_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints / f"stage{stage}", ckpt)
    tag_dir = ckpt / "step_00000002"
    target = tag_dir / ("mp_rank_00_model_states.pt" if stage == 0 else "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    marker = tmp_path / "pwned"
    state = torch.load(target, weights_only=False)  # the fixture's own file
    state["x"] = _Payload(marker)
    torch.save(state, target)
    _write_manifest(tag_dir)
    with pytest.raises(UserError) as resume:
        safe_load(str(target))
    with pytest.raises(UserError) as export:
        export_checkpoint(str(ckpt), str(tmp_path / "hf"))
    assert str(export.value) == str(resume.value)
    assert "contains a pickled" in str(export.value) and not marker.exists()
    assert not (tmp_path / "hf").exists()


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("case", ["missing_dir", "no_latest", "bad_tag", "out_exists"])
def test_export_cli_errors_are_one_line_exit_2(checkpoints, tmp_path, case):
    ckpt = tmp_path / "ckpt"
    if case != "missing_dir":
        (ckpt / "step_000002").mkdir(parents=True)
        (ckpt / "step_000002" / "mp_rank_00_model_states.pt").touch()
    if case == "bad_tag":
        (ckpt / "latest").write_text("step_999999")
    if case == "out_exists":
        ckpt = checkpoints / "stage0"
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").touch()
    proc = _run_tool("export_hf.py", str(ckpt), str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    expected = {"missing_dir": "does not exist", "no_latest": "step_000002", "bad_tag": "step_999999",
                "out_exists": "--overwrite"}[case]
    assert expected in lines[0]


# --- plot_run ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plot_run():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_run", TOOLS / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _taid_rows(steps: int = 150) -> list[dict]:
    """A 150-step TAID run as the trainer logs it (every key of a real one), eval every 10 steps and at step 0."""
    import math

    def evals(s: int) -> dict:
        nll = 5.7 + 7.2 * math.exp(-s / 12)  # perplexity ~400,000 -> ~300
        return {"eval/student_ppl": math.exp(nll), "eval/student_nll": nll, "eval/teacher_ppl": 35.2,
                "eval/kl": 2.4 + 7.8 * math.exp(-s / 15), "eval/top1_agreement": 0.32 - 0.31 * math.exp(-s / 20),
                "eval/tokens": 1016.0}

    rows = [{"step": 0, **evals(0)}]
    for s in range(1, steps + 1):
        loss = 2.4 + 8 * math.exp(-s / 20) + 0.05 * math.sin(s)
        rows.append({"step": s, "loss": loss, "train/taid": loss, "lr": 5e-4, "grad_norm": 1 + 20 * math.exp(-s / 30),
                     "perf/tokens_per_s": 140 + math.sin(s), "perf/step_s": 3.7 + 0.1 * math.sin(s),
                     "perf/teacher_s": 1.2 + 0.01 * math.cos(s), "perf/student_s": 1.6 + 0.01 * math.sin(s),
                     "perf/optimizer_s": 0.8 + 0.01 * math.sin(2 * s), "train/loss_tokens": 508.0 - s % 3,
                     "train/skipped_steps": 0.0, "taid/t": min(1.0, 0.4 + 0.6 * s / 120), "taid/m": 0.01 * math.cos(s),
                     "taid/J": loss, **(evals(s) if s % 10 == 0 else {})})
    return rows


def _write_metrics(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # the IHDR chunk holds width and height (big-endian) right after the signature and chunk header
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_default_panels_leave_out_constants_duplicates_and_details(plot_run, tmp_path):
    series = plot_run.read_series(_write_metrics(tmp_path, _taid_rows()))
    assert len(series) == 20
    keys, left_out = plot_run.select(series)
    assert keys == ["loss", "eval/kl", "eval/student_ppl", "eval/top1_agreement", "grad_norm", "perf/tokens_per_s",
                    "taid/m", "taid/t"]
    assert left_out["constant"] == {"train/skipped_steps": 0.0, "eval/teacher_ppl": 35.2, "eval/tokens": 1016.0,
                                    "lr": 5e-4}
    assert left_out["same"] == {"train/taid": "loss", "taid/J": "loss"}
    assert sorted(left_out["detail"]) == ["eval/student_nll", "perf/optimizer_s", "perf/step_s", "perf/student_s",
                                          "perf/teacher_s", "train/loss_tokens"]
    note = plot_run.left_out_note(left_out)
    assert "constant: train/skipped_steps = 0, eval/teacher_ppl = 35.2, eval/tokens = 1016, lr = 0.0005" in note
    assert "train/taid = loss" in note and note.endswith("(--all draws every series)")
    everything, none = plot_run.select(series, everything=True)
    assert sorted(everything) == sorted(series) and not any(none.values())
    # a learning-rate schedule is not constant: drawn
    series["lr"] = {s: 5e-4 * min(1.0, s / 10) for s in series["lr"]}
    assert "lr" in plot_run.select(series)[0]


def test_log_axis_for_series_spanning_decades(plot_run, tmp_path):
    assert plot_run.wants_log([400_000.0, 3_000.0, 300.0])
    assert not plot_run.wants_log([10.2, 2.4])  # KL: a factor of 4
    assert not plot_run.wants_log([0.007, 0.32])  # top-1 agreement: 46x, not two decades
    assert not plot_run.wants_log([0.0, 1e-4, 5e-4])  # lr warming up from 0
    assert not plot_run.wants_log([-3.0, 500.0])
    pytest.importorskip("matplotlib")
    series = plot_run.read_series(_write_metrics(tmp_path, _taid_rows()))
    scales = plot_run.plot(series, tmp_path / "curves.png", title="run")
    assert scales["eval/student_ppl"] == "log"
    assert {k for k, v in scales.items() if v == "log"} == {"eval/student_ppl"}
    assert _png_size(tmp_path / "curves.png")[0] > 1000


def test_plot_run_cli_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path, _taid_rows(40))
    proc = _run_tool("plot_run.py", str(tmp_path), "-o", str(tmp_path / "curves.png"), "--all")
    assert proc.returncode == 0, proc.stderr
    width, height = _png_size(tmp_path / "curves.png")
    assert width > 1000 and height > 7 * 250  # 20 panels in rows of 3


def test_plot_compare_one_line_per_dir_mean_over_seeds(plot_run, tmp_path):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path / "taid" / "seed_0", _taid_rows(40))
    _write_metrics(tmp_path / "taid" / "seed_1", _taid_rows(40))
    _write_metrics(tmp_path / "ce", _taid_rows(40))
    assert [len(plot_run.compare_group(tmp_path / d)) for d in ("taid", "ce")] == [2, 1]
    out = tmp_path / "cmp.png"
    assert plot_run.main(["--compare", str(tmp_path / "taid"), str(tmp_path / "ce"), "-o", str(out)]) == 0
    assert _png_size(out)[0] > 1000


def test_plot_run_errors(plot_run, tmp_path, capsys):
    proc = _run_tool("plot_run.py", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr
    (tmp_path / "metrics.jsonl").write_text("{not json}\n")
    assert plot_run.main([str(tmp_path)]) == 2 and "line 1" in capsys.readouterr().err
    _write_metrics(tmp_path, [{"step": s, "lr": 1e-4} for s in range(1, 5)])
    assert plot_run.main([str(tmp_path)]) == 2 and "every series is constant" in capsys.readouterr().err
    assert plot_run.main(["--compare", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "neither metrics.jsonl nor seed_*/metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_run.main(["--compare", str(tmp_path)])  # no -o
