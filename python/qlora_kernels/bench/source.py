"""The git commit of the source a benchmark measured, for its results file."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def source_commit(package: Path | None = None) -> dict:
    """{"commit": HEAD, "dirty": tracked files differ from it} of the git checkout the package
    (qlora_kernels by default) is imported from, or {"commit": None, "reason": ...} when it is
    not one (an installed wheel, no git)."""
    if package is None:
        import qlora_kernels

        package = Path(qlora_kernels.__file__).resolve().parent
    try:
        top = Path(_git(package, "rev-parse", "--show-toplevel"))
        # a wheel installed in a virtual environment inside a checkout sits in the checkout's
        # folder without being part of it
        tracked = _git(top, "ls-files", "--", str(package))
    except FileNotFoundError:
        return {"commit": None, "reason": "git is not installed"}
    except subprocess.CalledProcessError as e:  # not a checkout (an installed package), or one git refuses to read
        return {"commit": None, "reason": f"no git checkout at {package}: {e.stderr.strip()}"}
    if not tracked:
        return {"commit": None, "reason": f"{package} is not tracked by the git checkout {top} (an installed package)"}
    return {"commit": _git(top, "rev-parse", "HEAD"),
            "dirty": bool(_git(top, "status", "--porcelain", "--untracked-files=no"))}
