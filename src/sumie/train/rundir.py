"""The run folder's own bookkeeping: refuse to train over an existing run by accident, and keep
``log.jsonl`` consistent with the checkpoint a run resumes from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..io.checkpoint import CKPT_RE

# what a training run writes into its folder (diffusion runs and train-vae runs)
RUN_FILES = ("config.json", "log.jsonl", "report.json")
RUN_DIRS = ("samples", "vae", "curves")


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool = False) -> None:
    """Before any work: a fresh run needs an empty (or missing) folder; ``overwrite`` first deletes
    the previous run's checkpoints, log, config and samples (other files are left alone)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite starts it over; give one")
    if resume or not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; give a folder for the run")
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"{run_dir} is not empty ({shown}); continue its run with --resume, start it over with "
                         "--overwrite (deletes its checkpoints and log), or choose a new --out folder")
    for p in run_dir.iterdir():
        run_owned = (p.name in RUN_FILES or p.name in RUN_DIRS or CKPT_RE.match(p.name) is not None
                     or p.name.startswith(("ckpt-", ".old-ckpt-")))
        if not run_owned:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def truncate_log(log_path: str | Path, step: int) -> int:
    """Drop the ``log.jsonl`` entries after ``step`` (written after the checkpoint a run resumes from,
    then lost with a kill; the resumed run writes them again); returns how many were dropped. A torn
    last line (a kill mid-write) is dropped too."""
    log_path = Path(log_path)
    if not log_path.is_file():
        return 0
    kept, dropped = [], 0
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(entry, dict) and entry.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = log_path.with_name(f".{log_path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, log_path)
    return dropped
