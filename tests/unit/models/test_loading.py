"""Loading teachers/students from directories and inline configs, with the user errors for bad paths."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd.config.schema import StudentConfig, TeacherConfig
from kd.errors import UserError
from kd.models import load_student, load_teacher, load_tokenizer

TINY = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny Llama saved with safetensors, plus its weights for comparison."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}))
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_teacher_from_dir(saved_llama, dtype, torch_dtype):
    path, weights = saved_llama
    teacher = load_teacher(TeacherConfig(path=path, dtype=dtype), zero3_config=None)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    state = teacher.state_dict()
    for name, value in weights.items():
        assert state[name].dtype == torch_dtype
        torch.testing.assert_close(state[name], value.to(torch_dtype))


def test_resolve_path_is_applied(saved_llama):
    path, _ = saved_llama
    seen = []

    def resolve(p: str) -> str:
        seen.append(p)
        return path

    load_teacher(TeacherConfig(path="asset:tiny"), zero3_config=None, resolve_path=resolve)
    assert seen and seen[0] == "asset:tiny"


def test_student_inline_config_is_seeded_and_trainable():
    cfg = StudentConfig(config=TINY)
    teacher_cfg = TeacherConfig(config=TINY)
    rng_before = torch.random.get_rng_state()
    a = load_student(cfg, teacher_cfg=teacher_cfg, seed=3, zero3_config=None)
    # Building a model must not move the process RNG (data order, dropout depend on it).
    assert torch.equal(rng_before, torch.random.get_rng_state())
    b = load_student(cfg, teacher_cfg=teacher_cfg, seed=3, zero3_config=None)
    c = load_student(cfg, teacher_cfg=teacher_cfg, seed=4, zero3_config=None)
    assert a.training and all(p.requires_grad for p in a.parameters())
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == 320
    out = a(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 320)


def test_student_inline_bf16_and_gradient_checkpointing():
    cfg = StudentConfig(config=TINY, dtype="bf16", gradient_checkpointing=True)
    model = load_student(cfg, teacher_cfg=TeacherConfig(config=TINY), seed=0, zero3_config=None)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing


def test_student_from_dir(saved_llama):
    path, weights = saved_llama
    model = load_student(StudentConfig(path=path), teacher_cfg=TeacherConfig(path=path), seed=9, zero3_config=None)
    assert model.training
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], weights["model.norm.weight"])


def test_missing_directory(tmp_path):
    with pytest.raises(UserError) as err:
        load_teacher(TeacherConfig(path=str(tmp_path / "nope")), zero3_config=None)
    assert err.value.key == "teacher.path" and "does not exist" in err.value.message


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as err:
        load_student(StudentConfig(path=str(tmp_path)), teacher_cfg=TeacherConfig(config=TINY), seed=0, zero3_config=None)
    assert err.value.key == "student.path" and "config.json" in err.value.message


def test_missing_gguf_file(tmp_path):
    with pytest.raises(UserError) as err:
        load_teacher(TeacherConfig(path=str(tmp_path), gguf_file="m.gguf"), zero3_config=None)
    assert err.value.key == "teacher.gguf_file"


def test_path_to_a_gguf_file_says_how_to_fix(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"")
    with pytest.raises(UserError, match="gguf_file"):
        load_teacher(TeacherConfig(path=str(f)), zero3_config=None)


def test_inline_config_without_model_type():
    bad = {k: v for k, v in TINY.items() if k != "model_type"}
    with pytest.raises(UserError) as err:
        load_teacher(TeacherConfig(config=bad), zero3_config=None)
    assert err.value.key == "teacher.config"


def test_load_tokenizer(tmp_path):
    from tests.helpers.tiny import build_tiny_tokenizer

    original = build_tiny_tokenizer(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.get_vocab() == original.get_vocab()
    with pytest.raises(UserError) as err:
        load_tokenizer(str(tmp_path / "missing"))
    assert err.value.key == "tokenizer"
