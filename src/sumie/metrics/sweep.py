"""Sweeps of sampling settings: a grid of (sampler, steps, guidance scale), a table, and plots
of quality against cost (network evaluations and seconds per image)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

from .evaluate import SamplingSettings, metric_names, write_report


def parse_list(text: str | None, kind=str, name: str = "value") -> list:
    """'10,20,30' -> [10, 20, 30]; empty entries are errors."""
    if text is None:
        return []
    parts = [p.strip() for p in str(text).split(",")]
    if any(not p for p in parts):
        raise ValueError(f"empty entry in the {name} list {text!r}")
    try:
        return [kind(p) for p in parts]
    except ValueError as e:
        raise ValueError(f"cannot read {name} list {text!r}: {e}") from e


def grid(samplers: Sequence[str], steps: Sequence[int], guidance: Sequence[float],
         schedule: str | None = None) -> list[SamplingSettings]:
    """Every combination, sampler-major; steps must be >= 1 and guidance >= 0."""
    bad = [s for s in steps if s < 1]
    if bad:
        raise ValueError(f"steps must be >= 1, got {bad}")
    bad = [w for w in guidance if w < 0]
    if bad:
        raise ValueError(f"guidance scales must be >= 0, got {bad}")
    return [SamplingSettings(a, b, c, schedule) for a, b, c in itertools.product(samplers, steps, guidance)]


def _names(report: dict) -> dict[str, str]:
    f = report["features"]

    class _E:  # metric_names needs only the extractor's name and prefix
        name = f["name"]
        metric_prefix = "FID" if f["name"] == "inception-v3-fid" else "FD_" + f["name"].split("-")[0]

    return metric_names(_E)


def table_rows(report: dict) -> list[dict]:
    """One flat row per setting: settings, cost, metrics, adherence."""
    nm = _names(report)
    rows = []
    for r in report["results"]:
        m = r["metrics"]
        rows.append({"sampler": r["sampler"], "steps": r["steps"], "guidance": r["guidance_scale"],
                     "nfe": r["nfe_per_image"], "s_per_img": r["seconds_per_image"], nm["fd"]: m[nm["fd"]],
                     f"{nm['kid']}_x1e3": 1e3 * m[nm["kid"]]["mean"], nm["precision"]: m[nm["precision"]],
                     nm["recall"]: m[nm["recall"]],
                     "adherence": (r.get("adherence") or {}).get("accepted")})
    return rows


def markdown_table(report: dict) -> str:
    """The rows of :func:`table_rows` as a Markdown table (numbers rounded for reading)."""
    rows = table_rows(report)
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    ref = (report.get("reference") or {}).get("adherence") or {}
    foot = [f"n = {report['reference']['n']} images per setting; features: {report['features']['name']}"]
    if ref.get("accepted") is not None:
        foot.append(f"verifier adherence of the reference images: {ref['accepted']:.3f}")
    return "\n".join(lines) + "\n\n" + "; ".join(foot) + "\n"


def plot(report: dict, path: str | Path) -> Path:
    """Quality against cost: FD vs NFE, FD vs seconds per image, adherence vs NFE; one line per (sampler, guidance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nm = _names(report)
    rows = table_rows(report)
    has_adh = any(r["adherence"] is not None for r in rows)
    panels = [("nfe", nm["fd"], "network evaluations per image"), ("s_per_img", nm["fd"], "seconds per image (CPU)")]
    if has_adh:
        panels.append(("nfe", "adherence", "network evaluations per image"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["guidance"]), []).append(r)
    for ax, (xk, yk, xlabel) in zip(axes[0], panels):
        for (sampler, w), rs in groups.items():
            rs = sorted(rs, key=lambda r: r[xk])
            ax.plot([r[xk] for r in rs], [r[yk] for r in rs], marker="o", label=f"{sampler}, w={w:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yk if yk != "adherence" else "verifier adherence")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    title = f"{report.get('run', '')} ({report['features']['name']}, n={report['reference']['n']})"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    md = out_dir / "sweep.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown_table(report))
    return {"report": write_report(report, out_dir / "sweep.json"), "table": md, "plot": plot(report, out_dir / "sweep.png")}
