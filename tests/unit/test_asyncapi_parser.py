"""contracts/asyncapi.json passes the official AsyncAPI parser (@asyncapi/parser, the one the
AsyncAPI generator and CLI use), pinned by tests/support/asyncapi_parser/package-lock.json and
installed with npm into var/tools/node on first use (kept there for later runs)."""

from __future__ import annotations

import copy
import fcntl
import json
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "contracts" / "asyncapi.json"
PARSER = ROOT / "tests" / "support" / "asyncapi_parser"
TOOLS = ROOT / "var" / "tools" / "node"


@pytest.fixture(scope="module")
def parser_modules() -> Path:
    """The parser's node_modules: installed from the committed lock when missing or when the
    lock changed since (npm ci: exactly the locked versions; no install scripts run)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on the PATH: the AsyncAPI parser cannot run")
    TOOLS.mkdir(parents=True, exist_ok=True)
    lock = (PARSER / "package-lock.json").read_bytes()
    modules = TOOLS / "node_modules"
    # One install at a time, should two test runs start together.
    with open(TOOLS / ".install.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        installed = TOOLS / "package-lock.json"
        current = installed.is_file() and installed.read_bytes() == lock
        if not current or not (modules / "@asyncapi" / "parser").is_dir():
            for name in ("package.json", "package-lock.json"):
                shutil.copyfile(PARSER / name, TOOLS / name)
            done = subprocess.run(
                [npm, "ci", "--prefix", str(TOOLS), "--ignore-scripts", "--no-audit", "--no-fund"],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                (TOOLS / "package-lock.json").unlink(missing_ok=True)  # try again next time
                pytest.fail(f"npm ci failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return modules


def parse(modules: Path, path: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["node", str(PARSER / "parse.cjs"), str(modules), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_the_document_passes_the_official_asyncapi_parser(parser_modules: Path) -> None:
    report = parse(parser_modules, DOCUMENT)
    assert report["version"] == "3.6.6"
    errors = [d for d in report["diagnostics"] if d["severity"] == "error"]
    assert not errors, json.dumps(errors, indent=2)
    assert report["parsed"]
    for d in report["diagnostics"]:
        if d["severity"] == "warning":
            warnings.warn(
                f"AsyncAPI parser: {d['code']}: {d['message']} at {d['path']}", stacklevel=1
            )


def test_the_parser_run_reports_what_is_wrong(parser_modules: Path, tmp_path: Path) -> None:
    """The harness would say so: a document with a broken schema, a message outside its
    channel and an unknown binding field is refused, each found where it is."""
    document = json.loads(DOCUMENT.read_text())
    broken = copy.deepcopy(document)
    broken["components"]["schemas"]["pos.scan.data"]["type"] = "objekt"
    broken["components"]["messages"]["pos.scan"]["bindings"]["kafka"]["keys"] = {}
    broken["operations"]["receivePosCommands"]["messages"].append(
        {"$ref": "#/channels/pos.results/messages/pos.scan.result"}
    )
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    report = parse(parser_modules, path)
    errors = [d for d in report["diagnostics"] if d["severity"] == "error"]
    paths = {tuple(d["path"]) for d in errors}
    assert ("components", "schemas", "pos.scan.data") in paths
    assert ("components", "messages", "pos.scan", "bindings", "kafka", "keys") in paths
    assert ("operations", "receivePosCommands", "messages", "10") in paths
    assert not report["parsed"]
