"""Ctrl-C that works at once, even inside one long native operation.

Python runs a signal handler only between bytecodes, so a SIGINT that arrives during a
minutes-long convolution or attention call waits for it. :func:`prompt_interrupts` adds a
watchdog thread woken by the signal itself (``signal.set_wakeup_fd``, written by the C-level
handler at delivery): when the main thread has not stopped ``grace_s`` seconds after the
``kill_after``-th SIGINT/SIGTERM, it prints one line and ends the process (exit status 130).
Every file sumie writes goes to a temporary name first, so nothing half-written is left.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from collections.abc import Iterator


@contextmanager
def prompt_interrupts(kill_after: int = 1, grace_s: float = 2.0) -> Iterator[None]:
    """Within the block, the ``kill_after``-th SIGINT/SIGTERM ends the process within ``grace_s``
    seconds if the main thread has not finished by then (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter / unsupported
        reader.close()
        writer.close()
        yield
        return
    done = threading.Event()

    def watch() -> None:
        count = 0
        while not done.is_set():
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            count += sum(1 for b in data if b in (signal.SIGINT, signal.SIGTERM))
            if count >= kill_after and not done.wait(grace_s):
                sys.stderr.write("sumie: interrupted\n")
                sys.stderr.flush()
                os._exit(130)

    thread = threading.Thread(target=watch, name="sumie-interrupt-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old_fd)
        writer.close()  # the watchdog's recv sees end-of-file
        thread.join(1.0)
        reader.close()
