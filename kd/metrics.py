"""Run logging on rank 0: TensorBoard scalars, one JSONL record per optimizer step, generated prompt/completion
pairs (samples.jsonl and TensorBoard text), and a progress bar with ETA; and `read_metrics`, the one reader of a
run's metrics.jsonl that the tools share."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

from kd.errors import UserError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class MetricsLogger:
    """Writes `metrics.jsonl` and `tensorboard/` in the run directory. On ranks other than 0 every call is a no-op,
    so the trainer logs unconditionally."""

    def __init__(self, run_dir: str, *, enabled: bool, total_steps: int, start_step: int, progress_bar: bool, log_interval: int):
        self.enabled = enabled
        self.log_interval = log_interval
        self._bar = None
        self._pending: Optional[tuple[int, dict]] = None
        self._closed = False
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(run_dir, exist_ok=True)
        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._jsonl = open(os.path.join(run_dir, METRICS_FILE), "a", buffering=1)
        self._samples_path = os.path.join(run_dir, SAMPLES_FILE)
        self._samples = None  # opened on the first sample step: runs without generation write no file
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="kd", unit="step", dynamic_ncols=True, file=sys.stderr)
        self._start_time = time.time()
        self._start_step = start_step
        self._total_steps = total_steps

    def truncate_after(self, step: int) -> None:
        """Drop JSONL records (metrics and samples) past `step`: after a resume they belong to a run that crashed
        before its next checkpoint, and the resumed run writes them again (on a fresh start, step 0, everything
        goes)."""
        path = self._jsonl.name
        self._jsonl.close()
        _truncate_jsonl(path, step)
        self._jsonl = open(path, "a", buffering=1)
        if self._samples is not None:
            self._samples.close()
            self._samples = None
        if os.path.exists(self._samples_path):
            _truncate_jsonl(self._samples_path, step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Generated prompt/completion pairs of one step: one samples.jsonl line each ({"step", **pair}), written
        whole and flushed, and one TensorBoard text entry. A crash can only cut the last line short, which
        `truncate_after` drops on resume."""
        if not self.enabled or not samples:
            return
        if self._samples is None:
            self._samples = open(self._samples_path, "a", encoding="utf-8")
        self._samples.write("".join(json.dumps({"step": step, **pair}, ensure_ascii=False) + "\n" for pair in samples))
        self._samples.flush()
        self._tb.add_text("onpolicy/samples", _samples_markdown(samples), step)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """One optimizer step: a JSONL record with every scalar, TensorBoard scalars under the same tags."""
        if not self.enabled:
            return
        self._flush_pending(unless_step=step)
        record = {"step": step, **{k: _plain(v) for k, v in scalars.items()}}
        if self._pending is not None:  # eval of this very step joins its record
            record.update(self._pending[1])
            self._pending = None
        self._jsonl.write(json.dumps(record) + "\n")
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", refresh=False)
        elif step % self.log_interval == 0:
            self.print(f"step {step}/{self._total_steps} loss {scalars.get('loss', float('nan')):.4f} eta {self._eta(step)}")

    def log_histograms(self, step: int, histograms: dict[str, tuple[list[float], list[float]]]) -> None:
        """TensorBoard histograms of discrete values: {tag: (values, counts)} (e.g. a fusion's a* per expert). Each
        value gets its own bucket (right edge halfway to the next value); nothing goes to the JSONL."""
        if not self.enabled:
            return
        for tag, (values, counts) in histograms.items():
            pairs = sorted((v, c) for v, c in zip(values, counts))
            num = sum(c for _, c in pairs)
            if num <= 0:
                continue
            seen = [v for v, c in pairs if c > 0]
            xs = [v for v, _ in pairs]
            edges = [(a + b) / 2 for a, b in zip(xs, xs[1:])] + [xs[-1] + (xs[-1] - xs[-2] if len(xs) > 1 else 1.0) / 2]
            self._tb.add_histogram_raw(tag, min=seen[0], max=seen[-1], num=num, sum=sum(v * c for v, c in pairs),
                                       sum_squares=sum(v * v * c for v, c in pairs), bucket_limits=edges,
                                       bucket_counts=[c for _, c in pairs], global_step=step)

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        """Eval results go to TensorBoard now and into the JSONL record of the same step; an eval with no training
        step of its own (the step-0 baseline) gets a record of its own."""
        if not self.enabled:
            return
        self._flush_pending(unless_step=step)
        self._pending = (step, {k: _plain(v) for k, v in scalars.items()})
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, step)
        self._tb.flush()
        self.print(f"eval @ step {step}: " + ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in scalars.items()))

    def _flush_pending(self, unless_step: Optional[int] = None) -> None:
        if self._pending is not None and self._pending[0] != unless_step:
            self._jsonl.write(json.dumps({"step": self._pending[0], **self._pending[1]}) + "\n")
            self._pending = None

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "?"
        left = (time.time() - self._start_time) / done * (self._total_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def close(self) -> None:
        """Flush and close every file (idempotent: the trainer also closes in a `finally`, for a run that fails)."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._flush_pending()
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()
        if self._samples is not None:
            self._samples.close()


def _truncate_jsonl(path: str, step: int) -> None:
    """Keep the records of `path` with "step" <= `step` (none when `step` is 0), replacing the file atomically."""
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if step > 0 and json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
    """TensorBoard renders text as markdown: a heading per pair, prompt and completion as indented code blocks
    (indentation, not fences, so backticks inside a completion cannot break the layout)."""
    def block(text: str) -> str:
        return "\n".join("    " + line for line in str(text).splitlines() or [""])

    parts = []
    for pair in samples:
        parts.append(f"**sample {pair.get('sample')}** (data sample {pair.get('sample_id')}, {pair.get('tokens')} "
                     f"tokens, ended by {pair.get('finish_reason')})\n\nprompt:\n\n{block(pair.get('prompt', ''))}"
                     f"\n\ncompletion:\n\n{block(pair.get('completion', ''))}")
    return "\n\n---\n\n".join(parts)


def _plain(value: Any) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | os.PathLike, *, warn: Optional[Callable[[str], None]] = None) -> dict[int, dict[str, Any]]:
    """A run's metrics.jsonl as {step: record}, in step order; each record holds every key logged at that step.

    A step logged twice (a run resumed from an earlier checkpoint logs the steps after it again) keeps the later
    value of each key, which is what the resumed run did. A malformed *last* line is skipped (and passed to `warn`):
    a run that is still writing, or was killed, may have flushed half a line. A malformed line anywhere else, or a
    file with no record, is a `UserError` naming the file. Non-finite values were written as null and stay None.
    """
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"not found (is {os.fspath(run_dir)} a run directory, and has the run logged a step?)", file=path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if number == last and by_step:
                if warn is not None:
                    warn(f"skipping the incomplete last line {number} of {path}")
                continue
            raise UserError(f"line {number}: expected a JSON object with a `step`, got {line[:60]!r} ({err})",
                            file=path) from None
        by_step.setdefault(step, {}).update(record)
    if not by_step:
        raise UserError("holds no metrics records", file=path)
    return dict(sorted(by_step.items()))
