"""The fused-linear path of DistillationModule (student and teacher heads inside the loss kernel) computes the same
loss and student gradients as the logits path, for a divergence + CE, TAID and TRG on mapped layers; and refuses
what it cannot compute exactly. Single process, tiny random models, no DeepSpeed."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kd.config.schema import LossConfig, TRGConfig
from kd.engine.student import DistillationModule
from kd.errors import UserError
from kd.losses import DistillationLoss, LossContext, build_loss
from kd.models.heads import has_linear_head
from kd.engine.loss_path import decide
from kd.teachers import ModelTeacher, TeacherRequest

V_STUDENT, V_TEACHER, VOCAB = 97, 101, 97  # the teacher's head is padded past the shared vocabulary


def tiny_llama(layers: int, hidden: int, vocab: int, *, tied: bool, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # a padded tail
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(module: DistillationModule, teacher: ModelTeacher, b: dict, *, fused: bool) -> tuple[dict, dict]:
    """One forward + backward; returns the output dict and the student's gradients."""
    path = decide(module.loss, fused_linear=fused, teacher=teacher.info)  # the run's one decision
    assert path.teacher_head_in_loss == fused
    out_t = teacher(b, path.request)
    torch.manual_seed(123)  # TRG samples its graph nodes from torch's RNG
    with teacher.head_weight() as w_t:
        out = module(b, out_t, 4, w_t if fused else None)
    module.zero_grad(set_to_none=True)
    out["loss_sum"].backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out, grads


CASES = {
    "jsd+ce": LossConfig(name="jsd", beta=0.3, ce_weight=0.25, temperature=1.7),
    "reverse_kl": LossConfig(name="reverse_kl"),
    "taid": LossConfig(name="taid", ce_weight=0.1),
    "trg_mapped": LossConfig(name="forward_kl", trg=TRGConfig(layers="mapped", nodes_per_sequence=4, k=2)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tied", [False, True])
def test_fused_path_matches_logits_path(case, tied):
    teacher_model = tiny_llama(3, 48, V_TEACHER, tied=tied, seed=1)
    student = tiny_llama(2, 32, V_STUDENT, tied=tied, seed=2)
    ctx = LossContext(total_steps=10, student_hidden_size=32, teacher_hidden_size=48, student_num_layers=2,
                      teacher_num_layers=3)
    torch.manual_seed(5)
    loss = build_loss(CASES[case], ctx)
    teacher = ModelTeacher(teacher_model, None, torch.device("cpu"))
    assert teacher.info.has_linear_head
    b = batch()
    dense = DistillationModule(student, loss, VOCAB)
    fused = DistillationModule(copy.deepcopy(student), copy.deepcopy(loss), VOCAB, fused_linear=True)
    out_d, grads_d = run(dense, teacher, b, fused=False)
    out_f, grads_f = run(fused, teacher, b, fused=True)
    assert int(out_f["num_tokens"]) == int(out_d["num_tokens"]) == int((b["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(out_f["loss_sum"], out_d["loss_sum"], rtol=1e-5, atol=1e-5)
    assert out_f["terms"].keys() == out_d["terms"].keys()
    for name in out_d["terms"]:
        torch.testing.assert_close(out_f["terms"][name], out_d["terms"][name], rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_d.keys()
    head = "student.model.embed_tokens.weight" if tied else "student.lm_head.weight"
    assert head in grads_d
    for name, g in grads_d.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_teacher_final_hidden_times_head_gives_its_logits():
    model = tiny_llama(3, 48, V_TEACHER, tied=True, seed=1)
    teacher = ModelTeacher(model, None, torch.device("cpu"))
    b = batch(1)
    logits = teacher(b).logits
    out = teacher(b, TeacherRequest(signal="hidden", hidden=True, hidden_layers=(1, -1)))
    assert out.logits is None and len(out.hidden_states) == 2 and out.kind == "hidden"
    with teacher.head_weight() as w:
        torch.testing.assert_close(out.final_hidden @ w.t(), logits, rtol=1e-5, atol=1e-5)
    full = teacher(b, TeacherRequest(hidden=True))
    torch.testing.assert_close(out.hidden_states[0], full.hidden_states[1])
    torch.testing.assert_close(out.hidden_states[1], full.hidden_states[-1])
    bare = teacher(b, TeacherRequest(signal="hidden"))  # no hidden states asked for: only the final one comes back
    assert bare.logits is None and bare.hidden_states is None
    torch.testing.assert_close(bare.final_hidden, out.final_hidden)


def test_fused_path_refuses_what_it_cannot_compute():
    student = tiny_llama(2, 32, V_STUDENT, tied=False, seed=2)
    with pytest.raises(UserError, match="no fused-linear form"):
        DistillationModule(student, build_loss(LossConfig(name="ce")), VOCAB, fused_linear=True)
    torch.manual_seed(0)
    biased = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2))
    assert has_linear_head(biased)
    biased.lm_head = torch.nn.Linear(32, 97, bias=True)  # a head with a bias is not logits = h @ W^T
    assert not has_linear_head(biased)
    with pytest.raises(UserError, match="lm_head"):
        DistillationModule(biased, build_loss(LossConfig(name="forward_kl")), VOCAB, fused_linear=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", ["jsd+ce", "taid"])
def test_fused_path_matches_logits_path_bf16_on_gpu(case):
    """The same on CUDA in bf16 through the Triton kernels (tolerances of bf16 logits and gradients)."""
    device = torch.device("cuda")
    teacher_model = tiny_llama(3, 48, V_TEACHER, tied=False, seed=1).to(device, torch.bfloat16)
    student = tiny_llama(2, 32, V_STUDENT, tied=True, seed=2).to(device, torch.bfloat16)
    loss = build_loss(CASES[case], LossContext(total_steps=10))
    teacher = ModelTeacher(teacher_model, None, device)
    b = {k: v.to(device) for k, v in batch().items()}
    dense = DistillationModule(student, loss, VOCAB)
    fused = DistillationModule(copy.deepcopy(student), copy.deepcopy(loss), VOCAB, fused_linear=True)
    out_d, grads_d = run(dense, teacher, b, fused=False)
    out_f, grads_f = run(fused, teacher, b, fused=True)
    torch.testing.assert_close(out_f["loss_sum"], out_d["loss_sum"], rtol=2e-2, atol=2e-2)
    for name, g in grads_d.items():
        torch.testing.assert_close(grads_f[name].float(), g.float(), rtol=5e-2, atol=5e-3, msg=name)


def test_the_loss_path_is_decided_once_from_loss_and_teacher():
    from kd.teachers import TeacherInfo

    loss = build_loss(LossConfig(name="forward_kl"))
    linear = TeacherInfo(name="t", vocab_size=97, hidden_size=8, num_layers=2, has_linear_head=True,
                         signals=("dense", "hidden"))
    assert decide(loss, fused_linear=True, teacher=linear).request.signal == "hidden"
    assert decide(loss, fused_linear=False, teacher=linear).request.signal == "dense"
    other = TeacherInfo(name="t", vocab_size=97, hidden_size=8, num_layers=2, has_linear_head=False)
    path = decide(loss, fused_linear=True, teacher=other)  # no plain head: the teacher hands over its logits
    assert path.fused_linear and not path.teacher_head_in_loss and path.request.signal == "dense"
    store = TeacherInfo(name="store", vocab_size=97, hidden_size=0, num_layers=0, has_linear_head=False,
                        signals=("sparse",))
    # the divergences read a stored top-k signal too: the store is asked for what it has, on either path
    assert decide(loss, fused_linear=False, teacher=store).request.signal == "sparse"
    path = decide(loss, fused_linear=True, teacher=store)
    assert path.fused_linear and not path.teacher_head_in_loss and path.request.signal == "sparse"

    class DenseOnly(DistillationLoss):  # a loss written before stores existed: dense logits only (the default)
        pass

    with pytest.raises(UserError, match="produces sparse"):  # a dense-only loss on a top-k store: refused up front
        decide(DenseOnly(), fused_linear=False, teacher=store)
    assert not decide(build_loss(LossConfig(name="ce")), fused_linear=False, teacher=store).needs_teacher
