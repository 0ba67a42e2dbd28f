"""TRG: each term against a direct (loop) formula, the composed loss, masks, node sampling, tau, the memory rule, and
the engines handing the loss only the hidden states it names."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd.config.schema import LossConfig, TRGConfig
from kd.errors import UserError
from kd.losses import DivergenceLoss, LossContext, LossInputs, build_loss
from kd.losses import functional as F
from kd.losses.trg import (TRGLoss, contextual_loss, global_contrastive_loss, layer_pairs, local_graph_loss,
                           sample_nodes)

D_S, D_T = 6, 10
CTX = LossContext(total_steps=11, student_hidden_size=D_S, teacher_hidden_size=D_T, student_num_layers=2,
                  teacher_num_layers=4)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- direct formulas (loops, written from the math)
def direct_local(zs, zt, valid, k, sigma):
    out = torch.zeros(len(zs), dtype=torch.float64)
    nodes = [i for i in range(len(zs)) if valid[i]]
    for i in nodes:
        others = [j for j in nodes if j != i]
        others.sort(key=lambda j: float(((zt[i] - zt[j]) ** 2).sum()))
        nbrs = others[:k]
        if not nbrs:
            continue
        a_t = torch.stack([torch.exp(-((zt[i] - zt[j]) ** 2).sum() / (2 * sigma)) for j in nbrs]).double()
        a_s = torch.stack([torch.exp(-((zs[i] - zs[j]) ** 2).sum() / (2 * sigma)) for j in nbrs]).double()
        p_t, p_s = a_t / a_t.sum(), a_s / a_s.sum()
        out[i] = (p_t * (p_t / p_s).log()).sum()
    return out


def direct_global(q, zt, valid, tau):
    out = torch.zeros(len(q), dtype=torch.float64)
    nodes = [j for j in range(len(q)) if valid[j]]
    for i in nodes:
        denom = sum(math.exp(float(q[i] @ zt[j]) / tau) for j in nodes)
        out[i] = -math.log(math.exp(float(q[i] @ zt[i]) / tau) / denom)
    return out


def direct_context_mse(zs, zt, d):
    """MSE over the off-diagonal entries between the teacher's and the student's S, one sequence of m nodes:
    S_ij = exp(F_i.F_j / sqrt(d)) / sum_{l != i} exp(F_i.F_l / sqrt(d)) for j != i, F = sqrt(d) * unit features."""
    m = len(zs)
    if m < 2:
        return torch.zeros((), dtype=torch.float64)

    def rows(z):
        f = math.sqrt(d) * unit(z.double())
        s = torch.zeros(m, m, dtype=torch.float64)
        for i in range(m):
            others = [j for j in range(m) if j != i]
            e = torch.stack([torch.exp(f[i] @ f[j] / math.sqrt(d)) for j in others])
            s[i, others] = e / e.sum()
        return s

    return ((rows(zt) - rows(zs)) ** 2).sum() / (m * (m - 1))


# ---------------------------------------------------------------- the terms
def test_local_term_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    zs, zt = unit(torch.randn(9, D_S, generator=g)), unit(torch.randn(9, D_T, generator=g))
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    for k, sigma in [(3, 0.5), (1, 2.0), (20, 0.3)]:  # k > valid nodes: every other valid node is a neighbour
        got = local_graph_loss(zs, zt, valid, k, sigma)
        torch.testing.assert_close(got.double(), direct_local(zs, zt, valid, k, sigma), rtol=1e-4, atol=1e-6)
    assert (got[~valid] == 0).all()


def test_local_term_is_zero_when_student_geometry_equals_teacher():
    zt = unit(torch.randn(8, D_T))
    assert local_graph_loss(zt.clone(), zt, torch.ones(8, dtype=torch.bool), 3, 1.0).abs().max() < 1e-6


def test_global_term_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    q, zt = unit(torch.randn(7, D_T, generator=g)), unit(torch.randn(7, D_T, generator=g))
    valid = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    got = global_contrastive_loss(q, zt, valid, 0.2)
    torch.testing.assert_close(got.double(), direct_global(q, zt, valid, 0.2), rtol=1e-4, atol=1e-6)


def test_contextual_term_matches_direct_formula():
    g = torch.Generator().manual_seed(2)
    zs, zt = unit(torch.randn(2, 5, D_S, generator=g)), unit(torch.randn(2, 5, D_T, generator=g))
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    got = contextual_loss(zs, zt, valid, math.sqrt(D_T))
    for b in range(2):
        v = valid[b]
        m_b = int(v.sum())
        mse = direct_context_mse(zs[b][v], zt[b][v], D_T)
        # per-node values sum to m_b * MSE: row i carries (1/(m_b-1)) * sum_{j != i} (S^t_ij - S^s_ij)^2
        torch.testing.assert_close(got[b].double().sum(), m_b * mse, rtol=1e-4, atol=1e-8)
    assert (got[~valid] == 0).all()


def test_empty_and_single_node_rows_are_finite_with_finite_gradients():
    zs = unit(torch.randn(2, 4, D_S)).requires_grad_(True)
    zt = unit(torch.randn(2, 4, D_T))
    valid = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    flat = valid.flatten()
    total = (contextual_loss(zs, zt, valid, 3.0).sum() + local_graph_loss(zs.flatten(0, 1), zt.flatten(0, 1), flat, 2, 1.0).sum()
             + global_contrastive_loss(torch.nn.functional.pad(zs.flatten(0, 1), (0, D_T - D_S)), zt.flatten(0, 1), flat, 0.1).sum())
    total.backward()
    assert torch.isfinite(total) and float(total.detach()) == pytest.approx(0.0, abs=1e-6)  # one node: no relations
    assert torch.isfinite(zs.grad).all()


# ---------------------------------------------------------------- node sampling
def test_sample_nodes_picks_loss_tokens_only_and_weights_by_tokens_per_node():
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 2:12] = True  # 10 loss tokens (prompt masked)
    mask[1, [1, 4, 5]] = True  # 3 < M
    torch.manual_seed(0)
    idx, valid, weight = sample_nodes(mask, 4)
    assert idx.shape == (3, 4)
    assert valid.sum(1).tolist() == [4, 3, 0]
    assert mask.gather(1, idx)[valid].all()
    assert sorted(idx[1][valid[1]].tolist()) == [1, 4, 5]
    assert len(set(idx[0].tolist())) == 4  # without replacement
    torch.testing.assert_close(weight, torch.tensor([[2.5] * 4, [1.0] * 3 + [0.0], [0.0] * 4]))
    assert float(weight.sum()) == mask.sum()  # the node weights count every loss token once


def test_sample_nodes_is_reproducible_from_torch_rng_and_uniform():
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, :2] = False
    torch.manual_seed(5)
    a = sample_nodes(mask, 3)[0]
    torch.manual_seed(5)
    assert torch.equal(a, sample_nodes(mask, 3)[0])
    counts = torch.zeros(10)
    for _ in range(800):
        counts[sample_nodes(mask, 3)[0][0]] += 1
    assert counts[:2].sum() == 0
    assert (counts[2:] - 300).abs().max() < 60  # 800 * 3 / 8 = 300 expected per loss token


# ---------------------------------------------------------------- the composed loss
def make_inputs(b=2, length=7, vocab=13, pairs=1, seed=0, step=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[0, :2] = F.IGNORE_INDEX  # prompt
    labels[1, -3:] = F.IGNORE_INDEX  # padding
    hs = tuple(torch.randn(b, length, D_S, generator=g).requires_grad_(True) for _ in range(pairs))
    ht = tuple(torch.randn(b, length, D_T, generator=g) for _ in range(pairs))
    s_logits = torch.randn(b, length, vocab, generator=g).requires_grad_(True)
    return LossInputs(s_logits, torch.randn(b, length, vocab, generator=g), labels, hs, ht, step=step)


def direct_total(loss: TRGLoss, inputs: LossInputs, cfg: TRGConfig, tau: float):
    """kd sum + a * ctx + b * local + c * global over ALL loss tokens (valid when M >= every n_b), averaged over
    layer pairs; every node weight is 1 then."""
    mask = inputs.labels != F.IGNORE_INDEX
    kd = (F.forward_kl(inputs.student_logits, inputs.teacher_logits) * mask).sum().double()
    ctx = loc = glo = 0.0
    for p, (hs, ht) in enumerate(zip(inputs.student_hidden, inputs.teacher_hidden)):
        zs_rows, zt_rows = [], []
        for b in range(mask.shape[0]):
            zs_b, zt_b = unit(hs[b][mask[b]].detach().double()), unit(ht[b][mask[b]].double())
            ctx += mask[b].sum() * direct_context_mse(zs_b, zt_b, D_T)
            zs_rows.append(zs_b)
            zt_rows.append(zt_b)
        zs_all, zt_all = torch.cat(zs_rows), torch.cat(zt_rows)
        valid = torch.ones(len(zs_all), dtype=torch.bool)
        loc += direct_local(zs_all, zt_all, valid, cfg.k, cfg.sigma).sum()
        w = loss.projectors[p].weight.detach().double()
        glo += direct_global(unit(zs_all @ w.T), zt_all, valid, tau).sum()
    n = len(inputs.student_hidden)
    terms = {"trg/context": ctx / n, "trg/local": loc / n, "trg/global": glo / n}
    total = kd + cfg.context_weight * terms["trg/context"] + cfg.local_weight * terms["trg/local"] + cfg.global_weight * terms["trg/global"]
    return total, terms


@pytest.mark.parametrize("layers", ["final", "mapped"])
def test_composed_loss_matches_direct_formula(layers):
    cfg = TRGConfig(context_weight=2.0, local_weight=0.5, global_weight=0.25, nodes_per_sequence=16, k=3, sigma=0.7,
                    tau_start=0.2, tau_end=0.1, layers=layers)
    loss = build_loss(LossConfig(name="forward_kl", trg=cfg), CTX)
    assert isinstance(loss, TRGLoss) and isinstance(loss.logit_loss, DivergenceLoss)
    inputs = make_inputs(pairs=len(loss.student_hidden_layers), step=6)
    out = loss(inputs)
    total, terms = direct_total(loss, inputs, cfg, tau=0.15)  # 1-based step 6 of 11: halfway from 0.2 to 0.1
    torch.testing.assert_close(out.loss_sum.double(), total, rtol=1e-4, atol=1e-5)
    for name, value in terms.items():
        torch.testing.assert_close(out.terms[name].double(), torch.as_tensor(value, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert int(out.num_tokens) == int((inputs.labels != F.IGNORE_INDEX).sum())


def test_projector_and_student_hidden_get_gradients_and_teacher_does_not_matter_for_them():
    loss = build_loss(LossConfig(name="forward_kl", trg=TRGConfig(layers="final")), CTX)
    inputs = make_inputs()
    loss(inputs).loss_sum.backward()
    proj = loss.projectors[0].weight
    assert proj.shape == (D_T, D_S) and proj.grad is not None and proj.grad.abs().sum() > 0
    assert "projectors.0.weight" in loss.state_dict()  # checkpointed with the module
    assert inputs.student_hidden[0].grad.abs().sum() > 0


def test_masked_positions_neither_change_the_loss_nor_get_gradients():
    loss = build_loss(LossConfig(name="forward_kl", trg=TRGConfig(nodes_per_sequence=3)), CTX)
    inputs = make_inputs(length=9)
    torch.manual_seed(3)
    first = loss(inputs).loss_sum
    first.backward()
    ignored = inputs.labels == F.IGNORE_INDEX
    assert (inputs.student_hidden[0].grad[ignored] == 0).all()
    assert inputs.student_hidden[0].grad[~ignored].abs().sum() > 0
    # garbage (even inf) at ignored positions of either model changes nothing
    hs = inputs.student_hidden[0].detach().clone()
    ht = inputs.teacher_hidden[0].clone()
    hs[ignored], ht[ignored] = 1e6, float("inf")
    changed = LossInputs(inputs.student_logits, inputs.teacher_logits, inputs.labels, (hs,), (ht,))
    torch.manual_seed(3)
    torch.testing.assert_close(loss(changed).loss_sum, first.detach())


def test_all_ignored_micro_batch_adds_zero_and_finite_gradients():
    loss = build_loss(LossConfig(name="forward_kl", trg=TRGConfig()), CTX)
    inputs = make_inputs()
    inputs.labels[:] = F.IGNORE_INDEX
    out = loss(inputs)
    out.loss_sum.backward()
    assert float(out.loss_sum.detach()) == 0.0 and all(float(v) == 0.0 for v in out.terms.values())
    assert torch.isfinite(loss.projectors[0].weight.grad).all()


def test_zero_weight_terms_are_skipped_and_all_zero_is_an_error():
    loss = build_loss(LossConfig(name="forward_kl", trg=TRGConfig(global_weight=0.0, local_weight=0.0)), CTX)
    out = loss(make_inputs())
    assert set(out.terms) == {"kd", "trg/context"} and len(loss.projectors) == 0
    with pytest.raises(UserError) as err:
        build_loss(LossConfig(trg=TRGConfig(context_weight=0, local_weight=0, global_weight=0)), CTX)
    assert err.value.key == "loss.trg"


def test_composes_with_taid_and_ce_and_passes_their_hooks_through():
    taid = build_loss(LossConfig(name="taid", trg=TRGConfig()), CTX)
    out = taid(make_inputs())
    assert {"taid", "trg/context", "trg/local", "trg/global"} <= set(out.terms)
    logs = taid.on_step_end(1, {"loss": 1.0, "train/taid": 0.5})
    assert "taid/t" in logs and logs["trg/tau"] == pytest.approx(0.1)
    assert "logit_loss._extra_state" in taid.state_dict()  # TAID's t still reaches the checkpoint
    ce = build_loss(LossConfig(name="ce", trg=TRGConfig()), CTX)
    assert ce.needs_teacher and ce.needs_hidden_states


def test_tau_anneals_linearly_over_the_run():
    loss = build_loss(LossConfig(trg=TRGConfig(tau_start=0.3, tau_end=0.1)), CTX)  # total_steps 11
    assert [round(loss.tau(s), 6) for s in (1, 6, 11, 51)] == [0.3, 0.2, 0.1, 0.1]  # 1-based steps
    assert loss.on_step_end(6, {"loss": 1.0})["trg/tau"] == pytest.approx(0.2)  # the tau step 6 trained with


def test_layer_pairs():
    assert layer_pairs("final", LossContext()) == ((-1,), (-1,))
    ctx = LossContext(student_num_layers=6, teacher_num_layers=30)
    assert layer_pairs("mapped", ctx) == ((1, 2, 3, 4, 5, 6), (5, 10, 15, 20, 25, 30))
    ctx = LossContext(student_num_layers=4, teacher_num_layers=6)  # 1.5, 3, 4.5, 6: halves round up
    assert layer_pairs("mapped", ctx) == ((1, 2, 3, 4), (2, 3, 5, 6))


# ---------------------------------------------------------------- memory: graphs over the node set only
class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_never_materialises_a_matrix_over_all_tokens():
    b, length, m = 2, 2048, 8
    loss = TRGLoss(DivergenceLoss("forward_kl"), TRGConfig(nodes_per_sequence=m), context=CTX)
    labels = torch.randint(0, 5, (b, length))
    hs = (torch.randn(b, length, D_S, requires_grad=True),)
    inputs = LossInputs(torch.randn(b, length, 5, requires_grad=True), torch.randn(b, length, 5), labels, hs,
                        (torch.randn(b, length, D_T),))
    with _Shapes() as seen:
        loss(inputs).loss_sum.backward()
    inputs_numel = max(b * length * D_T, b * length * 5)
    # Anything larger than the inputs would be an N x N (or B x L x L) over tokens: 4096^2 = 16.7M elements.
    assert max(seen.numels) <= inputs_numel, max(seen.numels)


# ---------------------------------------------------------------- engines: only the named hidden states
def _tiny_llama(layers=3, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_teacher_returns_only_the_named_hidden_states_in_order():
    from kd.teachers import ModelTeacher, TeacherRequest

    model = _tiny_llama()
    teacher = ModelTeacher(model, None, torch.device("cpu"))
    batch = {"input_ids": torch.randint(0, 40, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    full = teacher(batch, TeacherRequest(hidden=True)).hidden_states
    assert len(full) == 4
    some = teacher(batch, TeacherRequest(hidden=True, hidden_layers=(3, 1, -1))).hidden_states
    assert len(some) == 3
    for got, want in zip(some, (full[3], full[1], full[3])):
        torch.testing.assert_close(got, want)
    # the last entry is the final-norm output: norm(output of the last decoder layer)
    captured = []
    hook = model.model.layers[-1].register_forward_hook(lambda mod, args, out: captured.append(out))
    teacher(batch)
    hook.remove()
    torch.testing.assert_close(full[-1], model.model.norm(captured[0]))
    assert teacher(batch).hidden_states is None


def test_distillation_module_hands_the_loss_the_named_shifted_student_layers():
    from kd.engine.student import DistillationModule

    seen = {}

    class Probe(TRGLoss):
        def forward(self, inputs):
            seen["student"], seen["teacher"] = inputs.student_hidden, inputs.teacher_hidden
            return super().forward(inputs)

    student = _tiny_llama(layers=2, hidden=16, seed=1)
    ctx = LossContext(total_steps=2, student_hidden_size=16, teacher_hidden_size=D_T, student_num_layers=2,
                      teacher_num_layers=4)
    loss = Probe(DivergenceLoss("forward_kl"), TRGConfig(layers="mapped"), context=ctx)
    module = DistillationModule(student, loss, vocab_size=40)
    ids = torch.randint(0, 40, (2, 6))
    t_hidden = tuple(torch.randn(2, 6, D_T) for _ in range(2))  # what the teacher returns for layers (2, 4)
    from kd.teachers import TeacherOutput

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    out = module(batch, TeacherOutput(logits=torch.randn(2, 6, 40), hidden_states=t_hidden), 1)
    assert loss.teacher_hidden_layers == (2, 4)
    full = student(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(seen["student"]) == 2
    for got, want in zip(seen["student"], (full[1], full[2])):
        torch.testing.assert_close(got, want[:, :-1])
    torch.testing.assert_close(seen["teacher"][1], t_hidden[1][:, :-1])
    assert torch.isfinite(out["loss_sum"])  # the module returns the LossOutput as a dict (for ZeRO-3 hooks)
