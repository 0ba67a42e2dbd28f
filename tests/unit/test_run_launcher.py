"""Ctrl-C during a run: the kd process waits for the launcher and its ranks to save and exit, instead of killing
the launcher and orphaning ranks in the middle of a checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

# a stand-in launcher: on SIGINT it "saves" for a second, writes a marker and exits 0, as kd's ranks do
CHILD = textwrap.dedent("""
    import signal, sys, time
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    open(sys.argv[1] + ".started", "w").close()
    while not stop:
        time.sleep(0.05)
    time.sleep(1.0)
    open(sys.argv[1], "w").write("saved")
""")

# SIGINT as a terminal's shell leaves it: a test run started in the background (`cmd &` in a script) inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler at all
PARENT = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from kd.cli import run_launcher
    sys.exit(run_launcher([sys.executable, "-c", sys.argv[1], sys.argv[2]], port=0))
""")


def test_first_ctrl_c_waits_for_the_ranks_to_save(tmp_path):
    marker = tmp_path / "saved"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / "saved.started").exists():
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.05)
    os.killpg(parent.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = parent.communicate(timeout=60)
    assert parent.returncode == 0, err
    assert marker.read_text() == "saved"  # the parent returned only after the child had finished saving
    assert "kd: interrupted: the ranks finish their step, save and exit; waiting for them" in err
    assert "Traceback" not in err
