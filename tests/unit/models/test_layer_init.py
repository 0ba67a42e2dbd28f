"""Student built from a subset of teacher layers: config surgery and a tensor-by-tensor weight copy."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kd.config.schema import StudentConfig, TeacherConfig
from kd.errors import UserError
from kd.models import load_student, load_teacher
from kd.models import layer_init

LAYERS = [0, 3]


def _llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(7)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=288, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def _expected_teacher_key(student_key: str) -> str:
    """Independent mapping: only `model.layers.<i>.` changes, to the teacher layer LAYERS[i]."""
    match = re.match(r"model\.layers\.(\d+)\.(.*)", student_key)
    return f"model.layers.{LAYERS[int(match[1])]}.{match[2]}" if match else student_key


def _assert_copied(student, teacher_state: dict[str, torch.Tensor]) -> None:
    state = student.state_dict()
    assert len(state) == len([k for k in teacher_state if not re.match(r"model\.layers\.[12]\.", k)])
    for key, value in state.items():
        torch.testing.assert_close(value.float(), teacher_state[_expected_teacher_key(key)].float(), rtol=0, atol=0)


def _save(model, path, **kwargs) -> dict[str, torch.Tensor]:
    model.save_pretrained(path, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True])
def test_copies_mapped_layers(tmp_path, tied):
    teacher_state = _save(_llama(tied), tmp_path)
    teacher_cfg = TeacherConfig(path=str(tmp_path))
    student = load_student(
        StudentConfig(init_from_teacher_layers=LAYERS), teacher_cfg=teacher_cfg, seed=0, zero3_config=None
    )
    assert student.config.num_hidden_layers == 2
    assert student.config.tie_word_embeddings == tied
    _assert_copied(student, teacher_state)
    if tied:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(student.lm_head.weight, student.model.embed_tokens.weight)
    logits = student(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 288) and torch.isfinite(logits).all()
    student.train()
    student(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss.backward()
    assert student.model.layers[1].mlp.down_proj.weight.grad is not None


def test_reads_safetensors_without_building_teacher(tmp_path, monkeypatch):
    """Sharded checkpoint, and the teacher must not be instantiated for the copy."""
    teacher_state = _save(_llama(False), tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()

    def forbidden(*args, **kwargs):
        raise AssertionError("teacher was instantiated")

    monkeypatch.setattr("kd.models.loading.load_teacher", forbidden)
    student = load_student(
        StudentConfig(init_from_teacher_layers=LAYERS, dtype="bf16"),
        teacher_cfg=TeacherConfig(path=str(tmp_path)), seed=0, zero3_config=None,
    )
    assert next(student.parameters()).dtype == torch.bfloat16
    _assert_copied(student, {k: v.to(torch.bfloat16) for k, v in teacher_state.items()})


def test_inline_teacher_fallback_matches_loaded_teacher():
    cfg = dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=288,
    )
    teacher_cfg = TeacherConfig(config=cfg)
    teacher_state = load_teacher(teacher_cfg, zero3_config=None).state_dict()
    student = load_student(
        StudentConfig(init_from_teacher_layers=LAYERS), teacher_cfg=teacher_cfg, seed=5, zero3_config=None
    )
    _assert_copied(student, teacher_state)


def test_out_of_range_layer(tmp_path):
    _save(_llama(False), tmp_path)
    with pytest.raises(UserError) as err:
        load_student(
            StudentConfig(init_from_teacher_layers=[0, 4]), teacher_cfg=TeacherConfig(path=str(tmp_path)),
            seed=0, zero3_config=None,
        )
    assert err.value.key == "student.init_from_teacher_layers"
    assert "4 layers" in err.value.message and "[4]" in err.value.message


def test_layer_types_are_cut():
    teacher = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    student = layer_init.student_config_from_teacher(teacher, [3, 0, 1])
    assert student.num_hidden_layers == 3
    assert student.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert student.hidden_size == 32 and teacher.num_hidden_layers == 4  # teacher config untouched
    Qwen2ForCausalLM(student)  # the cut config builds


def test_missing_teacher_tensor_is_reported(tmp_path):
    teacher = _llama(False)
    state = {k: v for k, v in teacher.state_dict().items() if k != "model.norm.weight"}
    student = LlamaForCausalLM(layer_init.student_config_from_teacher(teacher.config, LAYERS))
    with pytest.raises(layer_init.MissingTeacherTensors, match="model.norm.weight"):
        layer_init.copy_teacher_layers(student, LAYERS, layer_init.StateDictSource(state))
