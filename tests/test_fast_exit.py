"""The CLI's fast exit keeps everything Python's normal exit guarantees except object teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_exit_now_waits_for_threads_runs_atexit_and_flushes(tmp_path):
    script = textwrap.dedent(
        f"""
        import atexit, sys, threading, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from lorakit.fast_exit import exit_now

        atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").write("ran"))
        def late_writer():
            time.sleep(0.3)
            open({str(tmp_path / "thread")!r}, "w").write("done")
        threading.Thread(target=late_writer).start()
        sys.stdout.write("unflushed line without newline")
        exit_now(3)
        print("never reached")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "unflushed line without newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
