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

def test_plot_run_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "loss": 3.0 / s, "train/kd": 2.0 / s, "lr": 1e-4} for s in range(1, 21)]
    rows[4].update({"eval/kl": 0.5, "eval/top1_agreement": 0.3})
    rows[19].update({"eval/kl": 0.2, "eval/top1_agreement": 0.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _run_tool("plot_run.py", str(tmp_path), "-o", str(tmp_path / "curves.png"))
    assert proc.returncode == 0, proc.stderr
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # the IHDR chunk holds width and height (big-endian) right after the signature and chunk header
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def test_plot_run_errors(tmp_path):
    proc = _run_tool("plot_run.py", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr
    (tmp_path / "metrics.jsonl").write_text("{not json}\n")
    proc = _run_tool("plot_run.py", str(tmp_path))
    assert proc.returncode == 2 and "line 1" in proc.stderr
