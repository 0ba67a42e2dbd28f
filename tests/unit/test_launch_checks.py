"""`kd train` refuses, before launching anything, more processes than the machine has devices for and a rendezvous
port that is taken."""
from __future__ import annotations

import os
import socket

import pytest
import yaml

import kd.cli

RECIPE = {
    "run": {"output_dir": "/tmp/kd-launch-check-run"},
    "teacher": {"config": {"model_type": "llama", "vocab_size": 64}},
    "student": {"config": {"model_type": "llama", "vocab_size": 64}},
    "data": {"train": {"path": "asset:kjv-bible"}},
    "train": {"max_steps": 1},
}


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    def launch(*args, **kwargs):
        raise AssertionError("kd train launched processes")

    monkeypatch.setattr(kd.cli.subprocess, "call", launch)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return str(path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-core limit applies without GPUs")
def test_more_processes_than_devices(recipe, capsys):
    too_many = (os.cpu_count() or 1) + 1
    assert kd.cli.main(["train", recipe, "--nproc", str(too_many)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kd: error: {recipe}: run.nproc: asks for {too_many} processes but this machine has "
                   f"{os.cpu_count()} CPU core(s) and no GPU; lower run.nproc or --nproc"]


def test_port_in_use(recipe, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert kd.cli.main(["train", recipe, "--nproc", "1", "--master-port", str(port)]) == 2
    assert f"port {port} is already in use" in capsys.readouterr().err


def test_validate_builds_the_loss(tmp_path, capsys):
    """`kd validate` catches a bad loss name or options, not only schema errors."""
    from tests.helpers.tiny_run import build_teacher

    build_teacher(tmp_path / "teacher")
    recipe = {**RECIPE, "teacher": {"path": str(tmp_path / "teacher")}, "student": {"init_from_teacher_layers": [0]},
              "data": {"train": {"path": "asset:kjv-bible"}, "seq_len": 64},
              "loss": {"name": "forward_kll"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert kd.cli.main(["validate", str(path)]) == 2
    assert f"{path}: loss.name: unknown loss 'forward_kll'" in capsys.readouterr().err
    recipe["loss"] = {"name": "jsd"}
    path.write_text(yaml.safe_dump(recipe))
    assert kd.cli.main(["validate", str(path)]) == 0


def test_launch_command_is_deepspeeds_per_node_launcher(monkeypatch):
    import base64
    import json

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cmd = kd.cli.local_launch_command(2, 29999, ["--recipe", "r.yaml", "train.max_steps=3"])
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    world = json.loads(base64.urlsafe_b64decode(cmd[4].removeprefix("--world_info=")))
    assert world == {"localhost": [0, 1]}
    assert cmd[5:] == ["--master_addr=127.0.0.1", "--master_port=29999", "--log_level=warning", "--module", "kd.launch",
                       "--recipe", "r.yaml", "train.max_steps=3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # the user's choice of GPUs is kept
    world = json.loads(base64.urlsafe_b64decode(kd.cli.local_launch_command(2, 1, [])[4].removeprefix("--world_info=")))
    assert world == {"localhost": [4, 6]}
