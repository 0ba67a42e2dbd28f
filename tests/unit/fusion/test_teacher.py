"""FusionTeacher: the fused logits are the solver applied to each model's logits; built from a recipe by the factory
(every model a ZeRO-0 replica, one process); bad recipes and mismatched models refused with the key named."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from kd.cli import main as kd_main
from kd.config import load_recipe
from kd.config.schema import FusionConfig
from kd.errors import UserError
from kd.fusion import stats as fstats
from kd.fusion.solver import fuse_logits
from kd.teachers import ModelTeacher, TeacherRequest, build_teacher_source
from kd.teachers.fusion import FusionTeacher
from tests.helpers.tiny import build_tiny_tokenizer
from tests.helpers.tiny_run import make_tiny_run

VOCAB = 97


def tiny_llama(seed: int, *, hidden: int = 32, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256))


def batch(vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def replicas(*models) -> list[ModelTeacher]:
    return [ModelTeacher(m, None, torch.device("cpu")) for m in models]


@pytest.mark.parametrize("mode", ["single", "static"])
def test_fused_logits_are_the_solver_on_each_models_logits(mode):
    # the large base is padded past the vocabulary (as Qwen's are): its extra rows are cut before fusing
    large, small, e0, e1 = replicas(tiny_llama(1, hidden=48, layers=3, vocab=VOCAB + 7), tiny_llama(2),
                                    tiny_llama(3), tiny_llama(4))
    cfg = FusionConfig(small_base={"path": "s"}, experts=[{"path": "a"}, {"path": "b"}], mode=mode, chunk_rows=5)
    teacher = FusionTeacher(large, small, [e0, e1], cfg, vocab_size=VOCAB)
    b = batch()
    out = teacher(b)
    each = [m(b).logits[..., :VOCAB].reshape(-1, VOCAB) for m in (large, small, e0, e1)]
    ref = fuse_logits(each[0], each[1], each[2:], mode=mode, chunk_rows=3)
    assert out.kind == "dense" and out.logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(out.logits.reshape(-1, VOCAB), ref.logits, rtol=0, atol=1e-6)
    assert not torch.equal(out.logits.reshape(-1, VOCAB), each[0]), "the experts should move some position"

    stats = teacher.last_stats()
    names, vector = teacher.last_stats_vector()
    assert names == list(stats) and vector.dtype == torch.float64 and vector.tolist() == list(stats.values())
    keep = b["attention_mask"].reshape(-1).bool()
    assert stats["fusion/positions"] == keep.sum().item() == 12
    for t in range(2):
        assert stats[f"fusion/weight_sum/{t}"] == pytest.approx(ref.weights[keep, t].sum().item(), rel=1e-6)
        assert stats[f"fusion/active/{t}"] == (ref.weights[keep, t] != 0).sum().item()
    assert stats["fusion/kl_fused_large_sum"] == pytest.approx(ref.kl_to_large[keep].sum().item(), rel=1e-5)
    means = fstats.summary(stats)
    assert means["fusion/objective_mean"] == pytest.approx(ref.objective[keep].mean().item(), rel=1e-5)
    if mode == "single":
        picked = [(ref.selected[keep] == t).sum().item() / 12 for t in range(2)]
        assert [means[f"fusion/active_fraction/{t}"] for t in range(2)] == pytest.approx(picked)
    else:
        assert means["fusion/weight_mean/0"] == pytest.approx(1.0)


def test_logits_only():
    large, small, expert = replicas(tiny_llama(1), tiny_llama(2), tiny_llama(3))
    teacher = FusionTeacher(large, small, [expert], FusionConfig(small_base={"path": "s"}, experts=[{"path": "e"}]),
                            vocab_size=VOCAB)
    assert teacher.info.signals == ("dense",) and not teacher.info.has_linear_head
    assert teacher.last_stats() == {}
    for request in (TeacherRequest(hidden=True), TeacherRequest(signal="hidden")):
        with pytest.raises(UserError, match="TRG"):
            teacher(batch(), request)
    with pytest.raises(ValueError, match="no lm_head"):
        teacher.head_weight()


# --- from a recipe ----------------------------------------------------------------------------------------------


def write_model(path: Path, seed: int, *, hidden: int = 32, layers: int = 2, extra_token: bool = False) -> str:
    tokenizer = build_tiny_tokenizer()
    if extra_token:
        tokenizer.add_tokens(["<|not-in-the-base|>"])
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fusion_models")
    return {
        "small": write_model(root / "small", 10),
        "e0": write_model(root / "e0", 11),
        "e1": write_model(root / "e1", 12),
        "other_tokenizer": write_model(root / "other_tokenizer", 13, extra_token=True),
        "wider": write_model(root / "wider", 14, hidden=48, layers=3),
    }


def fusion_recipe(root: Path, dirs: dict[str, str], *, experts=("e0", "e1"), **fusion) -> Path:
    section = {"small_base": {"path": dirs["small"], "zero_stage": 0},
               "experts": [{"path": dirs[e], "zero_stage": 0} for e in experts], **fusion}
    return make_tiny_run(root, teacher={"zero_stage": 0, "fusion": section}, run={"nproc": 1})


def test_recipe_builds_a_fusion_teacher_and_validates(tmp_path, model_dirs, capsys):
    path = fusion_recipe(tmp_path, model_dirs, mode="joint", grid={"low": 0.0, "high": 1.0, "step": 0.5})
    assert kd_main(["validate", str(path)]) == 0
    recipe = load_recipe(str(path), [])
    teacher = build_teacher_source(recipe, device=torch.device("cpu"), resolve_path=lambda p: p)
    assert isinstance(teacher, FusionTeacher) and teacher.info.vocab_size == 320
    assert teacher.info.config.hidden_size == 64  # the large base's (tests/helpers/tiny_run.TEACHER_CONFIG)
    b = batch(vocab=320)
    out = teacher(b)
    each = [m(b).logits.reshape(-1, 320) for m in (teacher.large, teacher.small, *teacher.experts)]
    ref = fuse_logits(each[0], each[1], each[2:], mode="joint", grid=(0.0, 0.5, 1.0))
    torch.testing.assert_close(out.logits.reshape(-1, 320), ref.logits, rtol=0, atol=1e-6)


def test_different_tokenizer_refused_naming_both(tmp_path, model_dirs):
    recipe = load_recipe(str(fusion_recipe(tmp_path, model_dirs, experts=("e0", "other_tokenizer"))), [])
    with pytest.raises(UserError) as err:
        build_teacher_source(recipe, device=torch.device("cpu"), resolve_path=lambda p: p)
    assert err.value.key == "teacher.fusion.experts.1.path"
    assert model_dirs["other_tokenizer"] in err.value.message and str(tmp_path / "teacher") in err.value.message


def test_other_architecture_warns(tmp_path, model_dirs, caplog):
    recipe = load_recipe(str(fusion_recipe(tmp_path, model_dirs, experts=("wider",))), [])
    from kd.teachers.fusion import check_fusion_models

    with caplog.at_level(logging.WARNING, logger="kd.teachers.fusion"):
        assert check_fusion_models(recipe, build_tiny_tokenizer(), resolve_path=lambda p: p) == 320
    assert "hidden_size 48 vs 32" in caplog.text and model_dirs["wider"] in caplog.text


def test_trg_on_a_fusion_refused(tmp_path, model_dirs):
    path = fusion_recipe(tmp_path, model_dirs)
    recipe = load_recipe(str(path), ["loss.trg.k=2"])
    with pytest.raises(UserError, match="TRG") as err:
        build_teacher_source(recipe, device=torch.device("cpu"), resolve_path=lambda p: p)
    assert err.value.key == "loss.trg"


@pytest.mark.parametrize("fusion,key,fragment", [
    ({"experts": []}, "teacher.fusion", "at least one expert"),
    ({"grid": {"low": 0, "high": 2, "step": 0.3}}, "teacher.fusion.grid", "whole number of steps"),
    ({"grid": {"low": 1, "high": 0}}, "teacher.fusion.grid", "below low"),
    ({"grid": {"step": 0}}, "teacher.fusion.grid.step", "greater than 0"),
    ({"mode": "static", "static_weights": [1.0]}, "teacher.fusion", "one per expert"),
    ({"static_weights": [1.0, 1.0]}, "teacher.fusion", "mode: static"),
    ({"mode": "best"}, "teacher.fusion.mode", ""),
])
def test_bad_fusion_sections_refused(tmp_path, model_dirs, fusion, key, fragment):
    path = fusion_recipe(tmp_path, model_dirs)
    raw = yaml.safe_load(path.read_text())
    raw["teacher"]["fusion"].update(fusion)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as err:
        load_recipe(str(path), [])
    assert err.value.key == key and fragment in err.value.message
