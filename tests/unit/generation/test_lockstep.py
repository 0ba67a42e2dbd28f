"""Two ranks (a real gloo group, spawned like tests/unit/engine/test_dist.py) generating from a ZeRO-3 training
engine: a rank whose rows all end at once keeps running forwards until the other is done, parameters gathered once do
no all-gather per token (layer-by-layer gathering does), both give the unsharded replica's tokens, and the engine's
hooks and ids are as before, so training goes on unchanged."""
from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

EOS, PAD, NEW = 1, 0, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Trained(torch.nn.Module):
    """Stands in for kd's DistillationModule: the student is `.student`, the forward is a training loss."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, ids):
        return self.student(input_ids=ids, labels=ids, use_cache=False).loss


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.engine import dist
    # joins as kd's ranks do (dist.init: deepspeed imported, then init_distributed). A group created before deepspeed
    # is imported outlives destroy_process_group, and at exit a gloo thread still freeing the last collective's
    # tensors can abort the process ("terminate called without an active exception").
    dist.init()
    from kd.generation import SamplingConfig, Sampler, generate, left_pad, student_target
    from kd.generation.gather import _offload

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS)
    replica = LlamaForCausalLM(config).eval()
    module = _Trained(copy.deepcopy(replica))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()), config=ds)
    offload = _offload(engine)
    hooks = (len(offload.forward_hooks), len(offload.backward_hooks))
    ds_ids = [m.ds_id for m in engine.module.modules()]

    gathers = [0]  # every all-gather DeepSpeed's communication backend runs
    cdb = deepspeed.comm.comm.cdb
    for name in [n for n in dir(cdb) if "all_gather" in n and callable(getattr(cdb, n))]:
        def counted(*a, _f=getattr(cdb, name), **k):
            gathers[0] += 1
            return _f(*a, **k)
        setattr(cdb, name, counted)

    # rank 0's rows all end at the first token; rank 1 decodes NEW tokens (it may not end early: EOS is banned)
    prompts = [[5, 9, 13], [11]] if rank == 0 else [[7, 3, 22, 41], [60, 61], [8]]
    per_step = []

    def processor(logits, step):
        per_step.append(gathers[0])
        logits = logits.clone()
        if rank == 0:
            logits[:] = float("-inf")
            logits[:, EOS] = 0.0
        else:
            logits[:, EOS] = float("-inf")
        return logits

    ids, mask = left_pad(prompts, PAD)
    result = {}
    for gather in ("always", "never"):
        per_step.clear()
        out = generate(student_target(engine), ids, mask, sampler=Sampler(SamplingConfig(NEW, temperature=0.0)),
                       eos_ids=[EOS], pad_id=PAD, gather=gather, logits_processor=processor)
        result[gather] = {"forwards": out.forwards, "reasons": out.finish_reasons,
                          "tokens": [out.completion(r) for r in range(len(prompts))],
                          "gathers_between_steps": per_step[-1] - per_step[0]}
    with torch.no_grad():
        ref = generate(replica, ids, mask, sampler=Sampler(SamplingConfig(NEW, temperature=0.0)), eos_ids=[EOS],
                       pad_id=PAD, logits_processor=processor)
    result["replica_tokens"] = [ref.completion(r) for r in range(len(prompts))]
    result["hooks_restored"] = (len(offload.forward_hooks), len(offload.backward_hooks)) == hooks
    result["ds_ids_restored"] = [m.ds_id for m in engine.module.modules()] == ds_ids
    # training goes on: the engine's loss is the replica's (the weights are untouched), and a step runs
    batch = torch.tensor([[5, 9, 13, 2, 4]])
    loss = engine(batch)
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        result["loss_matches"] = abs(float(loss) - float(replica(input_ids=batch, labels=batch).loss)) < 1e-5
    dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.shutdown()  # what kd's ranks do at exit: leave the group together


def test_two_ranks_stay_in_lockstep_under_zero3(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for gather in ("always", "never"):
        # rank 0 finished at its first token but ran as many forwards as rank 1, which decoded NEW tokens
        assert r0[gather]["forwards"] == r1[gather]["forwards"] == NEW, gather
        assert r0[gather]["reasons"] == ["eos", "eos"] and r1[gather]["reasons"] == ["length"] * 3
        assert r0[gather]["tokens"] == [[EOS], [EOS]]
        for r in (r0, r1):
            assert r[gather]["tokens"] == r["replica_tokens"], gather
    # gathered once: not one all-gather from the first step to the last; layer by layer: some every step
    assert r0["always"]["gathers_between_steps"] == r1["always"]["gathers_between_steps"] == 0
    assert r0["never"]["gathers_between_steps"] >= NEW - 1 and r1["never"]["gathers_between_steps"] >= NEW - 1
    for r in (r0, r1):
        assert r["hooks_restored"] and r["ds_ids_restored"] and r["loss_matches"]
