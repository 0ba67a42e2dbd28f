"""kd: distributed knowledge distillation for causal language models on DeepSpeed."""
__version__ = "0.1.0"
