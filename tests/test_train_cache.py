"""train.cache_epochs: the first epochs encoded once and replayed from device memory."""

import pytest
import torch

from sumie.config import preset
from sumie.io.checkpoint import latest_checkpoint, load_tensors
from sumie.train import cache
from sumie.train.loop import Trainer, train


def _small(name: str, steps: int = 8):
    cfg = preset(name)
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.batch_size = steps, 4, 8
    return cfg


@pytest.mark.parametrize("name", ["tiny", "tiny-text"])  # class labels; captions through the text encoder
def test_cached_run_trains_exactly_as_the_uncached_run(name, tmp_path):
    """In pixel space the cache holds the very examples, labels and tokenized captions an uncached run
    reads, and draws condition dropout and noise from the same generators: the same loss trajectory."""
    plain = train(_small(name), tmp_path / "plain", progress=False)
    cfg = _small(name)
    cfg.train.cache_epochs = 2
    cached = train(cfg, tmp_path / "cached", progress=False)
    assert cached.losses == plain.losses
    wa, wb = (load_tensors(latest_checkpoint(tmp_path / r) / "ema.safetensors") for r in ("plain", "cached"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cache_replays_its_epochs_and_resumes_identically(tmp_path):
    cfg = _small("tiny-text", steps=10)
    cfg.train.cache_epochs = 1
    full = Trainer(cfg, tmp_path / "a", progress=False)
    result = full.run()
    assert full.cache.size == 10 * 8  # an epoch of shapes scenes is 2**20: no more than the run reads
    b = full.cache.batch(3, 5)
    again = full.cache.batch(3 + full.cache.size, 5)  # one cache length later: the same examples
    assert torch.equal(b["x0"], again["x0"]) and torch.equal(b["slots"], again["slots"])
    first = train(cfg, tmp_path / "b", progress=False, max_steps=4)
    rest = Trainer(cfg, tmp_path / "b", resume=True, progress=False).run()
    assert first.losses + rest.losses == result.losses


def test_cache_refuses_what_it_cannot_hold(tmp_path, monkeypatch):
    cfg = _small("tiny")
    cfg.train.cache_epochs = -1
    with pytest.raises(ValueError, match="cache_epochs must be >= 0"):
        Trainer(cfg, tmp_path / "a", progress=False)
    cfg.train.cache_epochs, cfg.latent.sample_posterior = 1, True
    with pytest.raises(ValueError, match="sample_posterior"):
        Trainer(cfg, tmp_path / "b", progress=False)
    cfg.latent.sample_posterior, cfg.train.max_steps = False, 10**12  # 2**20 scenes x 3 x 16 x 16 x 4 bytes: 3 GiB
    trainer = Trainer(cfg, tmp_path / "c", progress=False)
    monkeypatch.setattr(cache, "_free_memory", lambda device: 4 * 2**30)
    with pytest.raises(MemoryError, match="lower train.cache_epochs"):
        trainer.train_step()
