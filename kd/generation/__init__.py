"""Generation on kd's engines: batched greedy / sampled decoding with a KV cache, ranks in lockstep, parameters
gathered once per rollout under ZeRO-3 (see engines.py for the entry point, gather.py for the parameters, decode.py
for the loop, sampling.py for the token choice and its seeded generator)."""
from kd.generation.decode import Completions, decode, left_pad
from kd.generation.engines import Target, generate, student_target, teacher_target
from kd.generation.gather import GATHER_MODES, rollout
from kd.generation.sampling import Sampler, SamplingConfig, make_sampler

__all__ = ["Completions", "GATHER_MODES", "Sampler", "SamplingConfig", "Target", "decode", "generate", "left_pad",
           "make_sampler", "rollout", "student_target", "teacher_target"]
