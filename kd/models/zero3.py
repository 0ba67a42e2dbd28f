"""Build models straight into ZeRO-3 shards.

transformers builds a model under ``deepspeed.zero.Init`` (each parameter partitioned across ranks the moment it is
created, and checkpoint weights loaded into the shards) when it finds a live ``HfDeepSpeedConfig`` for stage 3. It finds
that object through a module-level weak reference, so the object must stay alive for the whole construction, and the
reference must be cleared afterwards: otherwise the *next* model built in this process (perhaps a ZeRO-2 student)
would silently be partitioned too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


def zero3_stage(ds_config: dict[str, Any] | None) -> bool:
    """True when ``ds_config`` is a DeepSpeed config dict with ``zero_optimization.stage`` 3."""
    if ds_config is None:
        return False
    zero = ds_config["zero_optimization"] if "zero_optimization" in ds_config else {}
    return ("stage" in zero) and int(zero["stage"]) == 3


@contextmanager
def zero3_construction(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Within this block, transformers builds/loads models partitioned by ZeRO-3 (``ds_config``), or normally if None.

    Raises ValueError when a config is given that is not stage 3: a caller asking for sharded construction with a
    stage that does not shard is a bug, not something to paper over.
    """
    if ds_config is None:
        yield
        return
    if not zero3_stage(ds_config):
        raise ValueError("zero3_construction needs a DeepSpeed config with zero_optimization.stage 3")
    # Imported lazily: deepspeed import is slow and pulls in accelerator detection.
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # registers itself through a weak reference
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive
        # zero.Init swaps torch.nn.functional.linear for its memory-saving variant process-wide and never puts it
        # back; every later model (a ZeRO-2 student next to a ZeRO-3 teacher) would pay for it. ZeRO-3 engines do
        # not need it: parameters are gathered by module hooks.
        torch.nn.functional.linear = linear


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """True for a parameter created under ``deepspeed.zero.Init`` (its data lives in shards across ranks)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The unpartitioned shape of a parameter, ZeRO-3 or not."""
    return param.ds_shape if is_partitioned(param) else param.shape


def assign_full(param: torch.Tensor, value: torch.Tensor | None) -> None:
    """Copy ``value`` (the full tensor) into ``param``, gathering and re-partitioning it when ZeRO-3 sharded.

    Under ZeRO-3 this is a collective: every rank must call it for the same parameter in the same order; only rank 0
    needs a ``value`` (``modifier_rank=0`` broadcasts rank 0's write). Without ZeRO-3 ``value`` is required.
    """
    if isinstance(param, torch.nn.Parameter) and is_partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
            if value is not None:
                with torch.no_grad():
                    param.data.copy_(value)
        return
    if value is None:
        raise ValueError("assign_full: a value is required for a parameter that is not ZeRO-3 partitioned")
    with torch.no_grad():
        param.copy_(value)
