"""What a run shows on the console: a progress bar on a terminal only, and the final table."""
from __future__ import annotations

import json
import os
import fcntl
import pty
import struct
import subprocess
import termios
import sys

from conftest import run_cnnlab


def test_final_table_reports_the_runs_own_results_and_no_bar_outside_a_terminal(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cnnlab("+debug=smoke", "trainer.progress=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    out = result.stdout
    table = out[out.index("lenet on synthetic"):]
    assert f"test accuracy  {summary['test_acc']:.2%}" in table
    assert f"best epoch     {summary['best_epoch']} of 2" in table
    assert f"parameters     {summary['params_total']:,}" in table
    assert f"run directory  {run_dir.resolve()}" in table
    assert "status         completed" in table
    assert table in (run_dir / "train.log").read_text()  # the log keeps it too
    # captured output is not a terminal: not one progress-bar frame
    assert "\r" not in result.stderr + out and "it/s" not in result.stderr + out


def test_progress_bar_is_drawn_on_a_terminal(tmp_path):
    """The same run inside a pseudo-terminal draws the per-epoch bar (its 2 s delay set to 0 here,
    so the tiny epoch is long enough to show it)."""
    code = ("import sys; import cnnlab.fit as t; t.PROGRESS_DELAY_S = 0; from cnnlab.__main__ import main; "
            f"sys.argv = ['cnnlab', '+debug=smoke', 'trainer.progress=true', 'hydra.run.dir={tmp_path / 'run'}']; main()")
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column window, as a real one has
    env = {**os.environ, "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdin=terminal, stdout=terminal,
                            stderr=terminal, env=env)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(controller)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\repoch 1/2:" in screen and "\repoch 2/2:" in screen  # bar frames, redrawn in place
    assert "/7 [" in screen and "it/s" in screen  # counting the 7 batches of an epoch (230 images / batch 32)
    # quiet again in the log file: only the per-epoch lines, no bar frames
    assert "\r" not in (tmp_path / "run" / "train.log").read_text()
