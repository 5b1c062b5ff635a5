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
