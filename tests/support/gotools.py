"""Tools written in Go (helm, promtool) for the deployment tests: from the PATH or
var/tools/go/bin, else built there from the Go module proxy once; without `go`, the test
that needs one is skipped, saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOBIN = ROOT / "var" / "tools" / "go" / "bin"


def go_tool(binary: str, module: str, timeout_s: float = 850) -> str:
    """The path of `binary`, built with `go install <module>` (a `path@version`) if need be."""
    for candidate in (shutil.which(binary), GOBIN / binary):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    go = shutil.which("go")
    if go is None:
        pytest.skip(
            f"{binary} is neither on the PATH nor at {GOBIN / binary}, and go is not installed "
            f"to build it: go install {module}"
        )
    GOBIN.mkdir(parents=True, exist_ok=True)
    # -mod=mod: an inherited -mod=vendor (a vendored project's environment) breaks @version.
    env = {**os.environ, "GOBIN": str(GOBIN), "GOFLAGS": "-mod=mod"}
    built = subprocess.run(
        [go, "install", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert built.returncode == 0, f"go install {module} failed:\n{built.stderr[-4000:]}"
    return str(GOBIN / binary)
