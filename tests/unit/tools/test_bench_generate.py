"""tools/bench_generate.py smoke test: the one-process part (HF generate and kd's loop on one replica) runs on a tiny
model with every row decoding exactly --new-tokens tokens, and the ratios are the quotients of the rates."""
from __future__ import annotations


from tests.helpers.tools import load_tool


def _load():
    return load_tool("bench_generate")


def test_one_process_part_and_ratios(capsys):
    bench = _load()
    summary = bench.main(["--layers", "1", "--hidden", "32", "--vocab", "64", "--batch", "2", "--prompt-len", "5",
                          "--new-tokens", "3", "--nproc", "0"])
    assert summary["hf_replica"] > 0 and summary["kd_replica"] > 0
    assert summary["kd_replica_vs_hf"] == summary["kd_replica"] / summary["hf_replica"]
    assert bench.summarize({"zero3_always": 6.0, "zero3_never": 2.0, "hf_replica": 3.0}) == {
        "zero3_always": 6.0, "zero3_never": 2.0, "hf_replica": 3.0, "gathered_once_vs_layers": 3.0,
        "gathered_once_vs_hf": 2.0}
    assert bench.summarize({"zero3_always": 6.0, "hf_replica_per_rank": 4.0})["gathered_once_vs_hf_per_rank"] == 1.5


def test_worker_flags_give_the_ranks_the_same_sizes_and_no_nproc():
    bench = _load()
    args = bench.parse_args(["--model", "m", "--batch", "4", "--prompt-len", "16", "--new-tokens", "8", "--nproc", "3"])
    flags = bench.worker_flags(args)
    assert not any(f.startswith("--nproc") for f in flags)  # torch.distributed.run would take it for its own
    rank = bench.parse_args(flags + ["--worker"])
    assert vars(rank) == {**vars(args), "nproc": 2, "worker": True}  # nproc: the default, unused by a rank
