"""Native checkpoints: safetensors weights + JSON, written atomically.

A checkpoint is a folder ``ckpt-<step>/`` holding

* ``model.safetensors``  raw network weights        * ``ema.safetensors``   EMA weights
* ``state.safetensors``  optimizer moments, RNG states
* ``state.json``         step, data position, optimizer hyper-parameters
* ``config.json``        the resolved :class:`sumie.config.RunConfig`

It is written into ``ckpt-<step>.tmp-<pid>/``, flushed to disk, and renamed into place in
one atomic ``rename``: a kill at any instant leaves either the old set of complete
checkpoints or the new one, never a half-written folder that looks complete.
Pickles are never loaded: weights are safetensors only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^ckpt-(\d+)$")
REQUIRED = ("model.safetensors", "ema.safetensors", "state.safetensors", "state.json", "config.json")
MODEL_FILES = ("config.json", "ema.safetensors")  # what an exported (inference-only) model folder holds
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# the model shipped in the package, accepted by name wherever a model folder is
BUNDLED_NAME = "bundled"
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "emoji-64"


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be read; the message says why and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; pickles and damaged files raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path):
        raise CheckpointError(
            f"{path} is a pickle (or zip-of-pickles) file; sumie never loads pickles by default because "
            "unpickling can run arbitrary code. Convert it to .safetensors with a tool you trust.")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                              "corrupt. Use an earlier checkpoint or re-export the weights.") from e


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: 8-byte little-endian header length, then the JSON header,
        return False       # whose length may well start with 0x80 or spell "PK"
    return head[:1] == b"\x80" or head[:2] == b"PK"  # pickle protocol byte / torch zip archive


def write_json(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    _fsync_file(tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def check_state_shapes(expected: dict[str, tuple], found: dict[str, tuple], what: str, *,
                       names: dict[str, str] | None = None, against: str = "model") -> None:
    """Every expected tensor present with its shape and nothing extra, else a :class:`CheckpointError`
    ("{what} does not match its config: ...") naming the tensors, by the file's names where
    ``names`` maps ours to them; ``against`` names what the expected shapes come from."""
    names = names or {}
    bad = [f"{names.get(k, k)}: file {tuple(found[k])} vs {against} {tuple(v)}"
           for k, v in expected.items() if k in found and tuple(found[k]) != tuple(v)]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if bad or missing or unexpected:
        parts = ([f"shape mismatch: {'; '.join(bad[:4])}"] if bad else []) + \
                ([f"missing {len(missing)} tensor(s), e.g. {missing[:3]}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}"] if unexpected else [])
        raise CheckpointError(f"{what} does not match its config: " + ", ".join(parts))


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextmanager
def on_meta() -> Iterator[None]:
    """Modules built inside are structure only: tensors on the meta device, and torch.nn.init's
    random initialisation skipped (as transformers' ``no_init_weights`` does). On meta tensors it
    would do no work, but it runs through torch's Python reference kernels, whose first use
    imports torch._dynamo: about a second of the first text-to-image call on a CPU."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, _keep)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def build_checked(cls, config, state: dict[str, torch.Tensor], what: str, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", *, names: dict[str, str] | None = None,
                  against: str = "model") -> torch.nn.Module:
    """``cls(config)`` in eval mode holding ``state`` (checked by :func:`check_state_shapes`, cast to
    ``dtype``), built on the meta device so no memory is spent on initial weights."""
    with on_meta():
        module = cls(config)
    check_state_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()},
                       {k: tuple(v.shape) for k, v in state.items()}, what, names=names, against=against)
    module.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, assign=True)
    return module.to(device=device, dtype=dtype).eval()


def write_folder(final: str | Path, files: dict[str, object]) -> Path:
    """Write ``files`` (name -> tensors dict, text, or JSON-able object) as the folder ``final``, atomically:
    everything goes into a temporary sibling folder, which then replaces ``final`` whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(tmp / name))
        elif isinstance(content, str):
            (tmp / name).write_text(content)
        else:
            (tmp / name).write_text(json.dumps(content, indent=2))
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # re-saving (e.g. the same step after a resume): replace it whole
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def write_checkpoint(run_dir: str | Path, step: int, files: dict[str, object]) -> Path:
    """Write ``files`` (name -> tensors dict or JSON-able object) as ``run_dir/ckpt-<step>``, atomically."""
    return write_folder(Path(run_dir) / f"ckpt-{step:07d}", files)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in REQUIRED):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale temporary folders."""
    run_dir = Path(run_dir)
    for p in run_dir.glob("ckpt-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def resolve_model_path(path: str | Path) -> Path:
    """``bundled`` (when no file or folder of that name is here) -> the bundled model's folder; any
    other path unchanged."""
    if str(path) == BUNDLED_NAME and not Path(path).exists():
        return BUNDLED_MODEL
    return Path(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (-> its newest checkpoint), a checkpoint folder, an exported model folder or
    ``bundled`` -> checkpoint folder."""
    path = resolve_model_path(path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint folder: {path}")
    if path.is_dir() and CKPT_RE.match(path.name):
        missing = [f for f in REQUIRED if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)})")
        return path
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None and all((path / f).is_file() for f in MODEL_FILES):
            return path  # an exported model folder (``sumie export``): weights and config, no training state
        if ckpt is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (ckpt-*/ with {', '.join(REQUIRED)}); "
                                  "train first with `sumie train --out DIR`")
        return ckpt
    raise CheckpointError(f"{path} is a file; pass the run folder or a ckpt-* folder")


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped tensor."""
    check_state_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()},
                       {k: tuple(v.shape) for k, v in state.items()}, source)
    module.load_state_dict(state)
