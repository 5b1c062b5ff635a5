import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sumie.io.checkpoint import latest_checkpoint, list_checkpoints, load_tensors
from sumie.models import load_model
from sumie.train.loop import Trainer, TrainingDiverged, train

from conftest import WAIT_S, wait_for


def test_loss_falls_on_a_tiny_run(tiny_config, tmp_path):
    tiny_config.train.max_steps = 120
    tiny_config.train.ckpt_every = 60
    trainer = Trainer(tiny_config, tmp_path / "run", progress=False)
    batch = trainer.get_batch(10_000, 0)  # held-out examples, fixed sigmas and noise

    def eval_loss():
        with torch.no_grad():
            cond = {"class_labels": batch["label"]}
            return float(trainer.loss_fn(trainer.denoiser, batch["x"], cond,
                                         generator=torch.Generator().manual_seed(0)).mean())

    before = eval_loss()
    res = trainer.run()
    assert res.step == 120 and res.status == "finished"
    assert eval_loss() < 0.8 * before
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "log.jsonl").is_file()
    denoiser, cfg = load_model(tmp_path / "run")
    assert cfg == tiny_config


def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path):
    full = train(tiny_config, tmp_path / "a", progress=False)
    first = train(tiny_config, tmp_path / "b", progress=False, max_steps=10)
    rest = Trainer(tiny_config, tmp_path / "b", resume=True, progress=False).run()
    assert first.step == 10 and rest.step == 20
    assert first.losses + rest.losses == full.losses  # bit-identical loss trajectory
    wa = load_tensors(latest_checkpoint(tmp_path / "a") / "ema.safetensors")
    wb = load_tensors(latest_checkpoint(tmp_path / "b") / "ema.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    tiny_config.train.ckpt_every = 1
    trainer = Trainer(tiny_config, tmp_path, progress=False)
    real = trainer.loss_fn

    def poisoned(den, x0, cond=None, generator=None):
        out = real(den, x0, cond, generator=generator)
        return out * float("nan") if trainer.step >= 3 else out

    trainer.loss_fn = poisoned
    with pytest.raises(TrainingDiverged, match="step 3.*last good checkpoint"):
        trainer.run()
    assert latest_checkpoint(tmp_path).name == "ckpt-0000003"
    den, _ = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in den.parameters())


def _cli(*args):
    return [sys.executable, "-m", "sumie.cli", *args]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_state_and_resume_continues(tmp_path, sig, spawn):
    run = tmp_path / "run"
    proc = spawn(_cli("train", "--preset", "tiny", "--out", str(run), "--no-progress",
                      "--set", "train.max_steps=100000", "--set", "train.ckpt_every=1000"),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: proc.poll() is not None or
                    ((run / "log.jsonl").is_file() and (run / "log.jsonl").stat().st_size > 0))
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out
    assert "interrupted" in out and "--resume" in out
    ckpt = latest_checkpoint(run)
    step = int(ckpt.name.split("-")[1])
    assert step >= 10
    res = subprocess.run(_cli("train", "--out", str(run), "--resume", "--no-progress", "--max-steps", str(step + 3)),
                         capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 0, res.stderr
    assert latest_checkpoint(run).name == f"ckpt-{step + 3:07d}"


def test_kill_during_save_never_leaves_a_broken_checkpoint(tmp_path, spawn):
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for attempt in range(3):
        args = ["train", "--out", str(run), "--no-progress", "--set", "train.ckpt_every=1",
                "--set", "train.max_steps=100000"]
        if attempt == 0:
            args += ["--preset", "tiny"]
        else:
            args += ["--resume"]

        proc = spawn(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait for new checkpoints to appear, then SIGKILL at a random instant (usually mid-save)
        assert wait_for(lambda: proc.poll() is not None or (latest_checkpoint(run) is not None and
                        int(latest_checkpoint(run).name[5:]) >= 3 * (attempt + 1)))
        assert proc.poll() is None, f"training ended early (exit {proc.returncode})"
        time.sleep(float(rng.uniform(0, 0.05)))
        proc.kill()
        proc.wait()
        den, _ = load_model(run)  # the newest complete checkpoint always loads
        assert all(torch.isfinite(p).all() for p in den.parameters())
        for c in list_checkpoints(run):
            load_tensors(c / "state.safetensors")
    # resuming after a SIGKILL works and cleans stale temporary folders
    res = subprocess.run(_cli("train", "--out", str(run), "--resume", "--no-progress", "--set",
                              "train.ckpt_every=1", "--max-steps", str(int(latest_checkpoint(run).name[5:]) + 1)),
                         capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 0, res.stderr
    assert not list(run.glob("ckpt-*.tmp-*"))


def test_trains_on_an_image_folder(tmp_path, tiny_config):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tiny_config.data.kind = "folder"
    tiny_config.data.path = str(folder)
    tiny_config.data.conditioning = "none"
    tiny_config.model.num_classes = None
    tiny_config.train.max_steps = 3
    res = train(tiny_config, tmp_path / "run", progress=False)
    assert res.step == 3 and all(np.isfinite(res.losses))


def test_missing_or_empty_data_folder_is_a_clear_cli_error(tmp_path):
    for path, msg in ((tmp_path / "nope", "nope"), (tmp_path, "no usable images")):
        res = subprocess.run(_cli("train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--no-progress",
                                  "--set", "data.kind=folder", "--set", f"data.path={path}"),
                             capture_output=True, text=True, timeout=WAIT_S)
        assert res.returncode == 2 and "sumie: error:" in res.stderr and "Traceback" not in res.stderr


def test_bf16_autocast_and_gradient_accumulation_paths(tiny_config, tmp_path):
    tiny_config.train.precision = "bf16"
    tiny_config.train.grad_accum = 2
    tiny_config.train.batch_size = 4
    tiny_config.train.max_steps = 2
    res = train(tiny_config, tmp_path / "run", progress=False)
    assert res.step == 2 and all(np.isfinite(res.losses))
    tiny_config.train.precision = "fp64"
    with pytest.raises(ValueError, match="valid: auto, fp32, bf16, fp16"):
        Trainer(tiny_config, tmp_path / "bad", progress=False)


def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    from sumie.train import loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for avx512_bf16, amx, expected in ((False, False, None), (True, False, torch.bfloat16),
                                       (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert loop.autocast_dtype("auto", cpu) is expected
        assert loop.autocast_dtype("fp32", cpu) is None and loop.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probes: emulated, fp32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert loop.autocast_dtype("auto", cpu) is None
    for supported, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda v=supported: v)
        assert loop.autocast_dtype("auto", cuda) is expected


def test_compiled_training_matches_eager_and_a_failed_compile_falls_back(tiny_config, tmp_path, monkeypatch):
    tiny_config.train.max_steps, tiny_config.train.ckpt_every, tiny_config.train.precision = 3, 3, "fp32"
    eager = train(tiny_config, tmp_path / "eager", progress=False)
    tiny_config.train.compile = True
    compiled = train(tiny_config, tmp_path / "compiled", progress=False)
    np.testing.assert_allclose(compiled.losses, eager.losses, rtol=1e-3)  # same data, noise and init
    a, b = (load_tensors(latest_checkpoint(r.run_dir) / "ema.safetensors") for r in (eager, compiled))
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes: checkpoints load anywhere
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3

    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("inductor: no working C++ compiler found")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no working C\\+\\+ compiler"):
        fallback = train(tiny_config, tmp_path / "fallback", progress=False)
    assert fallback.losses == eager.losses  # the failed step is redone from the same random state


def test_init_from_starts_at_the_models_ema_weights_and_checks_the_architecture(tmp_path):
    from sumie.config import preset
    from sumie.io.checkpoint import CheckpointError
    from sumie.models import export_model

    cfg = preset("tiny-text")
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.sample_every = 3, 3, 0
    train(cfg, tmp_path / "a", progress=False)
    model = export_model(tmp_path / "a", tmp_path / "model")  # fp16 EMA weights
    cfg.train.init_from = str(model)
    tr = Trainer(cfg, tmp_path / "b", progress=False)
    ema = load_tensors(model / "ema.safetensors")
    for k, v in tr.denoiser.net.state_dict().items():
        assert torch.equal(v, ema[k].float()) and torch.equal(tr.ema.shadow.state_dict()[k], v)
    text = load_tensors(model / "text_encoder_ema.safetensors")
    assert all(torch.equal(v, text[k].float()) for k, v in tr.text.state_dict().items())
    from sumie.io.checkpoint import read_json

    assert tr.step == 0 and tr.text.tokenizer.to_json() == read_json(model / "tokenizer.json")  # the model's vocabulary
    assert tr.run().step == 3
    cfg.model.pos_embed = True  # switching the position code on: same function at the start, new projections
    cfg.diffusion.p_mean = 0.3  # and another training noise distribution: the objective, not the model
    tr = Trainer(cfg, tmp_path / "c", progress=False)
    pos = {k: v for k, v in tr.denoiser.net.state_dict().items() if ".pos_proj." in k}
    assert pos and all(not v.any() for v in pos.values())
    assert all(torch.equal(v, ema[k].float()) for k, v in tr.denoiser.net.state_dict().items() if k not in pos)
    cfg.text.pooled, cfg.model.adm_in_channels = True, cfg.text.width  # the pooled prompt vector too
    tr = Trainer(cfg, tmp_path / "p", progress=False)
    net = tr.denoiser.net
    assert not net.label_emb[0][-1].weight.any() and net.label_emb[0][0].weight.any()
    with torch.no_grad():  # the fine-tune starts as the same function: the new embedding adds 0
        y = torch.randn(2, cfg.text.width)
        torch.testing.assert_close(net.label_emb(y), torch.zeros(2, net.time_embed[-1].out_features))
    assert all(torch.equal(v, ema[k].float()) for k, v in net.state_dict().items() if k in ema)
    assert tr.run().step == 3 and net.label_emb[0][-1].weight.any()  # and it learns to use it
    cfg.text.pooled, cfg.model.adm_in_channels = False, None
    cfg.diffusion.sigma_data = 0.7  # changes the denoiser: refused
    with pytest.raises(CheckpointError, match=r"\[diffusion\] config .* differs"):
        Trainer(cfg, tmp_path / "d", progress=False)
    cfg.diffusion.sigma_data = preset("tiny-text").diffusion.sigma_data
    cfg.model.model_channels *= 2
    with pytest.raises(CheckpointError, match=r"\[model\] config .* differs"):
        Trainer(cfg, tmp_path / "d", progress=False)


def test_fused_adamw_matches_the_reference_update_and_survives_a_checkpoint():
    from sumie.config import TrainConfig
    from sumie.train.optim import adamw, load_optimizer, optimizer_tensors

    torch.manual_seed(0)
    t = TrainConfig(lr=1e-2, weight_decay=0.01)
    nets = [torch.nn.Linear(5, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fast = adamw(nets[0].parameters(), t)
    ref = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, betas=tuple(t.adam_betas), weight_decay=0.01)
    assert fast.param_groups[0]["fused"] and not ref.param_groups[0]["fused"]
    x = torch.randn(8, 5)
    for _ in range(5):
        for net, opt in zip(nets, (fast, ref)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a state saved by the reference optimizer loads into a fused one, which stays fused
    tensors, groups = optimizer_tensors(ref)
    again = adamw(nets[0].parameters(), t)
    load_optimizer(again, tensors, groups)
    assert again.param_groups[0]["fused"]
    torch.testing.assert_close(again.state_dict()["state"][0]["exp_avg"], ref.state_dict()["state"][0]["exp_avg"])


def test_ema_averages_every_parameter_and_follows_a_moved_model():
    from sumie.train.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(net, decay=0.5)
    before = [p.detach().clone() for p in ema.shadow.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(7.0)
    ema.update(net)  # warm-up decay min(0.5, 2/11)
    d = 2 / 11
    for s, b, p in zip(ema.shadow.parameters(), before, net.parameters()):
        torch.testing.assert_close(s, b * d + p.detach() * (1 - d))
    assert torch.equal(ema.shadow[1].running_mean, net[1].running_mean)
    net.to(torch.float64)  # parameters re-materialised in place: the EMA sees the new values
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
        net[1].running_mean.fill_(-2.0)  # buffers are new tensors after .to(): the EMA copies these
    ema.update(net)
    assert torch.equal(ema.shadow[1].running_mean, torch.full((3,), -2.0))
    assert all(torch.isfinite(s).all() and s.dtype == torch.float32 for s in ema.shadow.parameters())
    assert all((s - 3.0).abs().max() < (b - 3.0).abs().max() for s, b in zip(ema.shadow.parameters(), before))


def test_a_non_empty_run_folder_needs_resume_or_overwrite(tiny_config, tmp_path):
    tiny_config.train.max_steps = 2
    train(tiny_config, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="not empty.*--resume.*--overwrite"):
        train(tiny_config, tmp_path / "run", progress=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    res = train(tiny_config, tmp_path / "run", progress=False, overwrite=True, max_steps=1)
    assert res.step == 1 and [c.name for c in list_checkpoints(tmp_path / "run")] == ["ckpt-0000001"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the run's own files are deleted
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1
    res = subprocess.run(_cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress"),
                         capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr


def test_resume_after_a_kill_truncates_the_log_to_the_checkpoint(tiny_config, tmp_path):
    tiny_config.train.log_every = 1
    tiny_config.train.ckpt_every = 5
    train(tiny_config, tmp_path / "run", progress=False, max_steps=8)
    # as after kill -9 at step 8: the newest checkpoint is step 5, the log goes on to step 8 (and a torn line)
    import shutil

    shutil.rmtree(tmp_path / "run" / "ckpt-0000008")
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    train(tiny_config, tmp_path / "run", resume=True, progress=False, max_steps=10)
    import json

    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_train_help_lists_every_preset():
    from sumie.cli import build_parser
    from sumie.config import PRESETS
    from sumie.train.vae import VAE_PRESETS

    sub = build_parser()._subparsers._group_actions[0].choices
    for command, names in (("train", PRESETS), ("train-vae", VAE_PRESETS)):
        (text,) = [a.help for a in sub[command]._actions if "--preset" in a.option_strings]
        assert all(name in text for name in names), (command, text)
