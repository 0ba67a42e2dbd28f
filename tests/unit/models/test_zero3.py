"""ZeRO-3 construction on a 1-process gloo group: models are partitioned, weights land in the shards."""
from __future__ import annotations

import re
import socket

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd.config.schema import StudentConfig, TeacherConfig
from kd.models import load_student, load_teacher, zero3_construction

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
LAYERS = [2, 0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group(monkeypatch):
    port = _free_port()
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _gathered(model) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_zero3_load_and_layer_init(tmp_path, gloo_group):
    torch.manual_seed(2)
    teacher = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256,
    ))
    teacher.save_pretrained(tmp_path)
    expected = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_cfg = TeacherConfig(path=str(tmp_path))

    sharded = load_teacher(teacher_cfg, zero3_config=DS_CONFIG)
    assert all(hasattr(p, "ds_id") for p in sharded.parameters())
    for key, value in _gathered(sharded).items():
        torch.testing.assert_close(value, expected[key])

    student = load_student(
        StudentConfig(init_from_teacher_layers=LAYERS), teacher_cfg=teacher_cfg, seed=0, zero3_config=DS_CONFIG
    )
    assert all(hasattr(p, "ds_id") for p in student.parameters())
    for key, value in _gathered(student).items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        source = f"model.layers.{LAYERS[int(m[1])]}.{m[2]}" if m else key
        torch.testing.assert_close(value, expected[source], rtol=0, atol=0)

    # The ZeRO-3 switch is off again: the next model is an ordinary one.
    plain = load_teacher(teacher_cfg, zero3_config=None)
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())


def test_zero3_construction_rejects_other_stages():
    with pytest.raises(ValueError):
        with zero3_construction({"zero_optimization": {"stage": 2}}):
            pass


def test_construction_leaves_torch_linear_alone(gloo_group):
    """zero.Init replaces torch.nn.functional.linear process-wide; kd puts the original back."""
    original = torch.nn.functional.linear
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with zero3_construction(config):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=config):
            torch.nn.Linear(4, 4)
    assert torch.nn.functional.linear is original
