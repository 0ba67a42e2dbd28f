"""TRG as a composable term: any logit loss + token-relationship-graph terms on hidden states.

TRG (Zhang, Liu, He, "Knowledge Distillation via Token-level Relationship Graph", 2023) distils *relations between
tokens*: which tokens are close to which in the teacher's representation space. kd adds it on top of whatever logit
loss ``loss.name`` builds (a divergence, TAID, ce) when the recipe has a ``loss.trg`` section:

    total = logit_loss + a * context + b * local + c * global         (a, b, c = loss.trg.*_weight)

Features: ``layers: final`` compares the final-norm outputs (the last entry of HF's hidden_states, after the final
norm for Llama/Qwen); ``layers: mapped`` compares every student layer l = 1..L_s with teacher layer
round(l * L_t / L_s) and averages the terms over the pairs, with one projector per pair. The engines hand the loss
only those entries (`student_hidden_layers` / `teacher_hidden_layers`).

Per micro-batch, M loss tokens per sequence are sampled as graph nodes (torch's RNG: seeded per rank by the trainer,
saved and restored with every checkpoint). The terms are in `kd.losses.trg.terms`. Each is a per-node loss, summed
with node weight n_b / m_b (loss tokens / sampled nodes of the node's sequence), so that like every kd loss it is a
per-token *sum* and the trainer's division by the step's loss-token count turns it into a per-token mean.

The InfoNCE temperature is annealed linearly, tau(s) = tau_start + (tau_end - tau_start) * s / (total_steps - 1) at
0-based step s; it is a function of the step, so there is no state to checkpoint. The projector(s) are parameters of
this module, which the trainer places inside the DeepSpeed-trained module: ZeRO shards, optimizes and checkpoints
them with the student.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from kd.config.schema import TRGConfig
from kd.errors import UserError
from kd.losses.base import DistillationLoss, FusedLinearInputs, LossContext, LossInputs, LossOutput, loss_token_mask
from kd.losses.trg.terms import (contextual_loss, gather_nodes, global_contrastive_loss, local_graph_loss, normalize,
                                 sample_nodes)


def layer_pairs(mode: str, context: LossContext) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student indices, teacher indices) into HF's hidden_states for ``layers: final | mapped``.

    mapped: student layer l in 1..L_s (index l = after layer l; l = L_s is the final-norm output) with teacher
    round(l * L_t / L_s), rounding halves up (integer arithmetic, so no float surprises).
    """
    if mode == "final":
        return (-1,), (-1,)
    n_s, n_t = context.student_num_layers, context.teacher_num_layers
    if n_s < 1 or n_t < 1:
        raise ValueError(f"layers: mapped needs the layer counts in LossContext (got student {n_s}, teacher {n_t})")
    student = tuple(range(1, n_s + 1))
    return student, tuple((2 * l * n_t + n_s) // (2 * n_s) for l in student)


class TRGLoss(DistillationLoss):
    """``logit_loss`` plus the weighted TRG terms (see the module docstring and `kd.losses.trg.terms`).

    Args:
        logit_loss: the loss ``loss.name`` built; its output, terms, state and ``on_step_end`` pass through.
        cfg: the recipe's ``loss.trg`` section.
        context: run facts: hidden sizes (projector), layer counts (mapped layers), total_steps (tau schedule).

    Logged terms (sums, divided by the trainer like every term): ``trg/context``, ``trg/local``, ``trg/global``,
    unweighted, each only when its weight is > 0; ``on_step_end`` adds ``trg/tau``, the temperature of the step.
    """

    needs_teacher = True
    needs_hidden_states = True

    def __init__(self, logit_loss: DistillationLoss, cfg: TRGConfig, *, context: LossContext):
        super().__init__()
        if logit_loss.needs_hidden_states:
            raise UserError(f"loss.trg cannot be added to {type(logit_loss).__name__}, which reads hidden states "
                            "itself", key="loss.trg")
        if cfg.context_weight == cfg.local_weight == cfg.global_weight == 0.0:
            raise UserError("all TRG weights are 0; remove the `loss.trg` section to train without TRG",
                            key="loss.trg")
        self.logit_loss = logit_loss
        self.cfg = cfg.model_copy()
        self.total_steps = max(1, context.total_steps)
        self.student_hidden_layers, self.teacher_hidden_layers = layer_pairs(cfg.layers, context)
        # Contextual logits sqrt(d_t) * cosine for both models (terms.contextual_loss); a context without sizes only
        # happens in hand-built tests, where d = 1 keeps the term defined.
        self.context_scale = math.sqrt(max(1, context.teacher_hidden_size))
        self.projectors = torch.nn.ModuleList()
        if cfg.global_weight > 0.0:
            d_s, d_t = context.student_hidden_size, context.teacher_hidden_size
            if d_s < 1 or d_t < 1:
                raise ValueError(f"the global TRG term needs hidden sizes in LossContext (got {d_s} -> {d_t})")
            self.projectors.extend(torch.nn.Linear(d_s, d_t, bias=False) for _ in self.student_hidden_layers)

    def tau(self, step: int) -> float:
        """InfoNCE temperature at 1-based optimizer step ``step``: linear from tau_start (step 1) to tau_end (the
        last step, total_steps)."""
        progress = min(1.0, max(0.0, (step - 1) / max(1, self.total_steps - 1)))
        return self.cfg.tau_start + (self.cfg.tau_end - self.cfg.tau_start) * progress

    @property
    def supports_fused_linear(self) -> bool:  # the TRG terms read hidden states, which the fused path has too
        return self.logit_loss.supports_fused_linear

    def term_names(self) -> Optional[tuple[str, ...]]:
        """The logit loss's terms, then each TRG term whose weight is on (in the order `_add_terms` adds them)."""
        logit = self.logit_loss.term_names()
        if logit is None:
            return None
        c = self.cfg
        weighted = (("trg/context", c.context_weight), ("trg/local", c.local_weight), ("trg/global", c.global_weight))
        return tuple(logit) + tuple(name for name, weight in weighted if weight > 0.0)

    def forward(self, inputs: LossInputs) -> LossOutput:
        """The logit loss's output with the weighted TRG sums added to ``loss_sum`` and the TRG terms to ``terms``."""
        return self._add_terms(self.logit_loss(inputs), inputs.labels, inputs.student_hidden, inputs.teacher_hidden,
                               inputs.step)

    def fused_linear_loss(self, inputs: FusedLinearInputs) -> LossOutput:
        """The same on the fused-linear path: the logit loss's fused form plus the TRG terms on the selected layers."""
        return self._add_terms(self.logit_loss.fused_linear_loss(inputs), inputs.labels, inputs.student_layers,
                               inputs.teacher_layers, inputs.step)

    def _add_terms(self, out: LossOutput, labels: torch.Tensor, student_hidden, teacher_hidden,
                   step: int) -> LossOutput:
        pairs = len(self.student_hidden_layers)
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("TRG needs student_hidden and teacher_hidden (the trainer must request hidden states)")
        if len(student_hidden) != pairs or len(teacher_hidden) != pairs:
            raise ValueError(f"TRG expects {pairs} hidden state(s) per model, got {len(student_hidden)} "
                             f"(student) and {len(teacher_hidden)} (teacher)")
        cfg = self.cfg
        idx, valid, weight = sample_nodes(loss_token_mask(labels), cfg.nodes_per_sequence)
        flat_valid, flat_weight = valid.flatten(), weight.flatten()
        tau = self.tau(step)
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            sums[name] = sums[name] + value if name in sums else value

        for p, (h_s, h_t) in enumerate(zip(student_hidden, teacher_hidden)):
            x_s = gather_nodes(h_s, idx)  # [B, M, d_s], only the sampled tokens leave the [B, L, H] tensors
            z_s, z_t = normalize(x_s), normalize(gather_nodes(h_t.detach(), idx))
            if cfg.context_weight > 0.0:
                add("trg/context", (weight * contextual_loss(z_s, z_t, valid, self.context_scale)).sum())
            flat_s, flat_t = z_s.flatten(0, 1), z_t.flatten(0, 1)
            if cfg.local_weight > 0.0:
                add("trg/local", (flat_weight * local_graph_loss(flat_s, flat_t, flat_valid, cfg.k, cfg.sigma)).sum())
            if cfg.global_weight > 0.0:
                q = normalize(self.projectors[p](flat_s.to(h_s.dtype)))  # module call: ZeRO-3 gathers the weight
                add("trg/global", (flat_weight * global_contrastive_loss(q, flat_t, flat_valid, tau)).sum())

        weights = {"trg/context": cfg.context_weight, "trg/local": cfg.local_weight, "trg/global": cfg.global_weight}
        loss_sum = out.loss_sum
        terms = dict(out.terms)
        for name, total in sums.items():
            mean_over_pairs = total / pairs
            loss_sum = loss_sum + weights[name] * mean_over_pairs
            terms[name] = mean_over_pairs.detach()
        return LossOutput(loss_sum=loss_sum, num_tokens=out.num_tokens, terms=terms)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """The logit loss's hook (TAID moves t here), plus the temperature the step ``step`` (1-based) trained with."""
        return {**self.logit_loss.on_step_end(step, metrics), "trg/tau": self.tau(step)}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layers={c.layers} (student {self.student_hidden_layers} <-> teacher {self.teacher_hidden_layers}), "
                f"M={c.nodes_per_sequence}, k={c.k}, sigma={c.sigma}, tau={c.tau_start}->{c.tau_end}, "
                f"weights context={c.context_weight} local={c.local_weight} global={c.global_weight}")
