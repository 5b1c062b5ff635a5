import os

import pytest
import torch

# The suite is sized for 2 CPU cores; keep torch from oversubscribing them.
torch.set_num_threads(int(os.environ.get("SUMIE_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def tiny_config():
    from sumie.config import preset

    cfg = preset("tiny")
    cfg.train.max_steps = 20
    cfg.train.ckpt_every = 10
    return cfg


# Generous limits for waits on other processes: a test waits on a file or an exit, never on the
# machine's speed, and a slow machine only makes it slower.
WAIT_S = 600.0


@pytest.fixture
def spawn():
    """Start a process in its own process group; whatever happens in the test, the group is killed
    (SIGKILL) at teardown so no training process outlives its test."""
    import signal
    import subprocess

    procs: list[subprocess.Popen] = []

    def start(args, **kw):
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.communicate(timeout=WAIT_S)
        except Exception:  # noqa: BLE001 - teardown must not hide the test's own failure
            pass


def wait_for(pred, timeout: float = WAIT_S, poll: float = 0.05) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(poll)
    return False
