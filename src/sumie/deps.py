"""Optional dependencies: checked before a command starts its work, so a missing one is one line
naming the extra to install, not a traceback after minutes of computing."""

from __future__ import annotations

import importlib.util

# module -> the pip extra of sumie that installs it
EXTRAS = {"matplotlib": "plot", "diffusers": "bench"}


class MissingDependency(ValueError):
    """An optional package a command needs is not installed; the message says how to install it."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported here (found on the path; not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module entry set to None
        return False


def require(what: str, *modules: str) -> None:
    """Raise :class:`MissingDependency` naming ``what`` needs, and the extra, unless all ``modules`` import."""
    missing = [m for m in modules if not available(m)]
    if missing:
        extras = sorted({EXTRAS.get(m, m) for m in missing})
        spec = f"sumie[{','.join(extras)}]"
        raise MissingDependency(f"{what} needs {' and '.join(missing)}, which is not installed: "
                                f"pip install '{spec}' (from a checkout: pip install -e '.[{','.join(extras)}]')")
