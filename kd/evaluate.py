"""Old home of the eval metrics (now kd.eval_metrics) and `kd eval` (now kd.eval_cli)."""
# shim until the trainer imports kd.eval_metrics; remove
from kd.eval_metrics import SUM_FIELDS, batch_sums, finish

__all__ = ["SUM_FIELDS", "batch_sums", "finish"]
