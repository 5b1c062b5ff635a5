"""What a new user meets first (issue 29): one-line errors before any work, warnings that name
what was ignored, the bundled model by name, Ctrl-C that stops at once."""

import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from sumie.cli import main
from sumie.io.checkpoint import BUNDLED_MODEL, CheckpointError, resolve_checkpoint

from conftest import WAIT_S

HAS_BUNDLED = (BUNDLED_MODEL / "config.json").is_file()
needs_bundled = pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model is not built")


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sumie: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_out_that_cannot_be_written_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import sumie.generate as gen

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(gen.TextToImage, "load", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _one_line_error(capsys, ["generate", "x", "--out", str(blocker / "sub" / "img.png")])
    assert "is a file" in err
    _one_line_error(capsys, ["generate", "x", "--out", str(tmp_path)])  # a folder, not a file
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert "not writable" in _one_line_error(capsys, ["generate", "x", "--out", str(ro / "img.png")])
        finally:
            ro.chmod(0o755)


def test_missing_optional_dependencies_are_named_before_work(tmp_path, capsys, monkeypatch):
    import sumie.deps as deps

    monkeypatch.setattr(deps, "available", lambda m: m not in ("matplotlib", "diffusers"))
    for argv in (["explain", "curves", str(tmp_path)], ["explain", "attention", "bundled", "--prompt", "a"]):
        assert "pip install 'sumie[plot]'" in _one_line_error(capsys, argv)
    out = tmp_path / "bench"
    err = _one_line_error(capsys, ["bench", "samplers", "--quick", "--out", str(out)])
    assert "diffusers and matplotlib" in err and "sumie[bench,plot]" in err
    assert "sumie[plot]" in _one_line_error(capsys, ["bench", "samplers", "--no-diffusers", "--out", str(out)])
    assert not out.exists()
    monkeypatch.undo()
    assert deps.available("json") and not deps.available("no_such_module_for_sumie")


def test_tokenizer_errors_are_one_line(capsys, monkeypatch):
    import sumie.cli as cli
    from sumie.text.clip_tokenizer import TokenizerError

    def fail(args):
        raise TokenizerError("no CLIP vocabulary: pass --tokenizer DIR")

    monkeypatch.setitem(cli.COMMANDS, "generate", fail)
    assert "--tokenizer" in _one_line_error(capsys, ["generate", "x"])


class _Gadget:
    def __reduce__(self):
        return (os.getcwd, ())


def test_refused_pickle_is_said_in_sumies_words(tmp_path):
    from sumie.io.sd.tensors import load_pickle

    bad = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _Gadget()}, bad)
    with pytest.raises(CheckpointError) as e:
        load_pickle(bad, allow_pickle=True)
    msg = str(e.value)
    assert "\n" not in msg and "restricted unpickler refused" in msg and "posix.getcwd" in msg
    assert "weights_only" not in msg and "add_safe_globals" not in msg
    damaged = tmp_path / "cut.ckpt"
    damaged.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged") as e:
        load_pickle(damaged, allow_pickle=True)
    assert "\n" not in str(e.value)
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": _Gadget()}))
    with pytest.raises(CheckpointError, match="refused"):
        load_pickle(raw, allow_pickle=True)


def test_ctrl_c_ends_the_process_even_when_the_main_thread_cannot_react(spawn):
    code = ("import signal, sys, time\n"
            "from sumie.interrupt import prompt_interrupts\n"
            "with prompt_interrupts(kill_after=1, grace_s=0.2):\n"
            "    signal.signal(signal.SIGINT, lambda *a: None)  # as if stuck in one long native call\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(3600)\n")
    proc = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130 and "sumie: interrupted" in err


def test_one_ctrl_c_is_left_to_training(spawn):
    # kill_after=2, as for `sumie train`: the first Ctrl-C is the program's (a checkpoint at the next step)
    code = ("import signal, threading, time\n"
            "from sumie.interrupt import prompt_interrupts\n"
            "seen = threading.Event()\n"
            "with prompt_interrupts(kill_after=2, grace_s=0.1):\n"
            "    signal.signal(signal.SIGINT, lambda *a: seen.set())\n"
            "    print('ready', flush=True)\n"
            "    while not seen.is_set():\n"
            "        time.sleep(0.01)\n"
            "    time.sleep(0.5)  # longer than the grace: a second signal would have ended it by now\n"
            "print('saved', flush=True)\n")
    proc = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0 and "saved" in out, err


def test_cost_estimate_and_refusal():
    from sumie.cost import describe, sd_request_cost, unet_flops
    from sumie.nn.unet import UNetConfig
    from sumie.nn.vae import VAEConfig

    sd15 = UNetConfig.sd15()
    per_call = unet_flops(sd15, 2, (64, 64))  # 512x512 with CFG: ~1.4 TFLOP measured (README)
    assert 1.0e12 < per_call < 2.5e12
    assert unet_flops(sd15, 2, (128, 128)) > 4 * per_call  # attention grows faster than the pixels
    small = sd_request_cost(sd15, VAEConfig(), n=1, height=512, width=512, calls=20, guided=True,
                            weight_bytes=0, device=torch.device("cpu"))
    assert "TFLOP" in describe(small, torch.device("cpu"))
    huge = sd_request_cost(sd15, VAEConfig(), n=1, height=4096, width=4096, calls=20, guided=True,
                           weight_bytes=0, device=torch.device("cpu"))
    assert huge.peak_bytes > 20 * 2**30 and huge.seconds > 100 * small.seconds
    from dataclasses import replace

    with pytest.raises(ValueError, match="needs about .* GB of memory"):
        describe(replace(huge, available_bytes=8 * 2**30), torch.device("cpu"))


@needs_bundled
def test_bundled_is_a_model_name_everywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("bundled") == BUNDLED_MODEL
    from sumie.models import load_text_encoder

    assert load_text_encoder("bundled") is not None
    (tmp_path / "bundled").mkdir()  # a folder of that name here is what the user means
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint("bundled")


@needs_bundled
def test_unknown_words_are_named_and_the_final_line_says_what_was_drawn(tmp_path, capsys):
    from sumie.models import load_text_encoder
    from sumie.text.small import ignored_words

    enc = load_text_encoder(BUNDLED_MODEL)
    assert ignored_words(enc, "a red roof, (\U0001f3e0:1.2) house.") == ["roof", "\U0001f3e0"]
    out = tmp_path / "x.png"
    assert main(["generate", "a red roof", "--steps", "2", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "warning: the model does not know 'roof'" in cap.err
    assert "'a red roof'" in cap.out and "bundled" in cap.out and out.is_file()


@needs_bundled
def test_batched_images_equal_single_draws_within_the_stated_tolerance():
    from sumie.generate import TextToImage

    model = TextToImage.load()
    batch = model("a red apple", n=3, seed=10, steps=6).images
    for i in range(3):
        alone = model("a red apple", n=1, seed=10 + i, steps=6).images[0]
        d = abs(alone.astype(int) - batch[i].astype(int))
        assert d.max() <= 2 and (d > 0).mean() < 0.01  # the tolerance generate.py and the README state


def test_demo_trains_a_number_of_steps_not_minutes(tmp_path, capsys, monkeypatch):
    import sumie.config as config

    real = config.preset

    def cheap(name):  # the demo's own recipe, sampled with 2 steps to keep the test short
        cfg = real(name)
        cfg.sample.steps = 2
        return cfg

    monkeypatch.setattr(config, "preset", cheap)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--steps", "3", "--no-progress"]) == 0  # continues the same run
    assert "trained 3 steps" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--steps", "50", "--minutes", "0", "--no-progress"]) == 0
    assert "warning: only 3 of 50 steps" in capsys.readouterr().err
