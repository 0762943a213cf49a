"""End the CLI process without Python's slow teardown of torch, diffusers and transformers.

After the last line of the trainer, the interpreter's own finalization (deallocating the ~600,000 objects those
libraries create at import) took 1.9 s of a 20 s embedded run on two cores (issue 22). `exit_now` does what
finalization does that matters here, in the same order, and then leaves at once: it waits for non-daemon
threads, runs the atexit handlers (logging and TensorBoard flush, multiprocessing joins its workers, trackers
finish) and flushes the standard streams. What it skips is freeing memory the OS reclaims anyway.

Only the command-line entry points call it; importing code (tests, the bench, notebooks) never exits this way.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_now(code: int) -> None:
    """Exit with `code` after non-daemon threads, atexit handlers and stream flushes; skip object teardown."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own entry to the handlers registered with atexit.register
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    os._exit(code)
