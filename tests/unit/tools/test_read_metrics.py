"""kd.metrics.read_metrics, the metrics.jsonl reader behind tools/compare_losses.py and tools/plot_run.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kd.errors import UserError
from kd.metrics import MetricsLogger, read_metrics


def _write(run_dir: Path, text: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_reads_what_the_logger_writes(tmp_path):
    logger = MetricsLogger(str(tmp_path), enabled=True, total_steps=2, start_step=0, progress_bar=False,
                           log_interval=100)
    logger.log_eval(0, {"eval/kl": 0.9})
    logger.log_step(1, {"loss": 2.5, "lr": 1e-4})
    logger.log_eval(2, {"eval/kl": 0.4})
    logger.log_step(2, {"loss": float("nan"), "lr": 5e-5})
    logger.close()
    assert read_metrics(tmp_path) == {
        0: {"eval/kl": 0.9},
        1: {"loss": 2.5, "lr": 1e-4},
        2: {"loss": None, "lr": 5e-5, "eval/kl": 0.4},  # the eval joins its step's record; NaN is written as null
    }


def test_later_values_win_and_steps_come_sorted(tmp_path):
    lines = [{"step": 3, "loss": 1.0}, {"step": 1, "loss": 3.0}, {"step": 3, "loss": 0.5, "eval/kl": 0.2}]
    run = _write(tmp_path, "".join(json.dumps(r) + "\n" for r in lines))
    records = read_metrics(run)
    assert list(records) == [1, 3]
    assert records[3] == {"loss": 0.5, "eval/kl": 0.2}


def test_cut_last_line_is_skipped_with_a_warning(tmp_path):
    run = _write(tmp_path, '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n\n')
    warnings: list[str] = []
    assert read_metrics(run, warn=warnings.append) == {1: {"loss": 2.0}}
    assert len(warnings) == 1 and "line 2" in warnings[0]


@pytest.mark.parametrize("text, words", [
    ('garbage\n{"step": 1, "loss": 2.0}\n', "line 1: expected a JSON object with a `step`"),
    ('{"loss": 2.0}\n{"step": 1, "loss": 2.0}\n', "line 1: expected a JSON object with a `step`"),
    ('[1, 2]\n{"step": 1}\n', "line 1: expected a JSON object"),
    ("{cut\n", "line 1"),  # a lone line is not "the end of a longer file": nothing to fall back on
    ("\n", "holds no metrics records"),
    (None, "not found"),
])
def test_bad_files_are_user_errors_naming_the_file(tmp_path, text, words):
    run = _write(tmp_path / "run", text) if text is not None else tmp_path / "missing"
    with pytest.raises(UserError) as info:
        read_metrics(run)
    message = str(info.value)
    assert message.startswith(str(run / "metrics.jsonl") + ": ") and words in message, message
    assert "\n" not in message


def test_plot_series_keep_numbers_only(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_run", Path(__file__).resolve().parents[3] / "tools" / "plot_run.py")
    plot_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_run)
    lines = [{"step": 1, "loss": 2, "skipped": True, "note": "x"}, {"step": 2, "loss": None}, {"step": 2, "lr": 0.1}]
    run = _write(tmp_path, "".join(json.dumps(r) + "\n" for r in lines))
    series = plot_run.read_series(run)
    assert series == {"loss": {1: 2.0}, "lr": {2: 0.1}}
    assert all(not math.isnan(v) for s in series.values() for v in s.values())
