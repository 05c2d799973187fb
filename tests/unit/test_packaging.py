"""What a production install gets: the service and its contracts, none of the sandboxes,
the local stack, the demo, the bench or the tests."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = ("voucher_sandboxes", "tests", "bench")


def _uv() -> str:
    found = shutil.which("uv") or str(ROOT / "var" / "tools" / "bin" / "uv")
    if not Path(found).exists():
        pytest.skip("uv not found (make sync installs it)")
    return found


def test_the_service_wheel_holds_no_sandbox_demo_or_test_code(tmp_path: Path) -> None:
    subprocess.run(
        [_uv(), "build", "--wheel", "--package", "voucher-bridge", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )
    (wheel,) = tmp_path.glob("voucher_bridge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert "voucher_bridge/app.py" in modules
    # The console's pages and their assets ship with the service (they are not Python).
    assert {
        "voucher_bridge/console/templates/overview.html",
        "voucher_bridge/console/static/console.js",
    } <= set(names)
    leaked = [n for n in names if any(w in n for w in ("sandbox", "localstack", "demo", "seed"))]
    assert leaked == []
    requires = next(n for n in names if n.endswith("METADATA"))
    metadata = zipfile.ZipFile(wheel).read(requires).decode()
    assert "voucher-bridge-sandboxes" not in metadata


def test_the_service_imports_nothing_dev_only() -> None:
    for path in (ROOT / "services" / "voucher_bridge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in DEV_ONLY, f"{path.name} imports {name}"
