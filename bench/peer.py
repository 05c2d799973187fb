"""The benchmark's JVM peer, Confluent's Parallel Consumer (`bench/peers/parallel-consumer`):
built here with Maven on first use, then run as `java -jar` (bench/README.md).

The build's output goes to `var/bench/parallel-consumer/` (the jar and its `lib/`), never into
the work tree. A stamp of the sources (pom.xml and src/) says whether it is current; when it is
not, Maven builds it offline (`-o`: every jar already in the local repository) or, failing that,
online, fetching from Maven Central once. No Java 17+ or no Maven: `PeerUnavailable`, and the
bench skips the peer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bench" / "peers" / "parallel-consumer"
OUTPUT = ROOT / "var" / "bench" / "parallel-consumer"  # <build><directory> in the pom
JAR = OUTPUT / "parallel-consumer-peer.jar"
STAMP = OUTPUT / ".sources.sha256"
BUILD_LOG = ROOT / "var" / "bench" / "parallel-consumer-build.log"
MIN_JAVA = 17
BUILD_TIMEOUT_S = 900


class PeerUnavailable(Exception):
    """The peer cannot run here (no Java 17+, no Maven, or the build failed): skip it."""


@dataclass(frozen=True)
class Peer:
    command: list[str]
    java: str  # the runtime's version, e.g. 17.0.15
    versions: dict[str, str]  # from the pom: parallel-consumer, kafka-clients, jackson
    built: str  # "current" (nothing to do), "offline" or "online"


def java_executable() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


def java_version(java: str) -> str:
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"{java} -version failed: {exc}") from exc
    found = re.search(r'version "([^"]+)"', done.stderr + done.stdout)
    if done.returncode != 0 or found is None:
        raise PeerUnavailable(f"{java} -version failed: {(done.stderr or done.stdout).strip()}")
    return found.group(1)


def _major(version: str) -> int:
    """17 of "17.0.15", 8 of "1.8.0_392"."""
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    if len(numbers) == 2 and numbers[0] == 1:
        return numbers[1]
    return numbers[0] if numbers else 0


def sources_digest() -> str:
    digest = hashlib.sha256()
    files = [SOURCE / "pom.xml", *sorted(p for p in (SOURCE / "src").rglob("*") if p.is_file())]
    for path in files:
        digest.update(str(path.relative_to(SOURCE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def pom_versions() -> dict[str, str]:
    pom = (SOURCE / "pom.xml").read_text()
    found = {}
    for label, prop in (
        ("parallel-consumer", "parallel-consumer"),
        ("kafka-clients", "kafka"),
        ("jackson", "jackson"),
    ):
        match = re.search(rf"<{re.escape(prop)}\.version>([^<]+)<", pom)
        if match:
            found[label] = match.group(1)
    return found


def _current(digest: str) -> bool:
    return (
        JAR.is_file()
        and (OUTPUT / "lib").is_dir()
        and STAMP.is_file()
        and (STAMP.read_text().strip() == digest)
    )


def ensure() -> Peer:
    """The peer's command line, building it first if its sources changed since the last build."""
    java = java_executable()
    if java is None:
        raise PeerUnavailable("no Java found (java on PATH, or JAVA_HOME)")
    version = java_version(java)
    if _major(version) < MIN_JAVA:
        raise PeerUnavailable(f"Java {version} found, the peer needs {MIN_JAVA} or newer")
    command = [java, "-jar", str(JAR)]
    digest = sources_digest()
    if _current(digest):
        return Peer(command, version, pom_versions(), "current")
    mvn = shutil.which(os.environ.get("MVN") or "mvn")
    if mvn is None:
        raise PeerUnavailable("Maven (mvn, or $MVN) not found: it is needed to build the peer")
    BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    if "JAVA_HOME" not in env:
        env["JAVA_HOME"] = str(Path(os.path.realpath(java)).parents[1])
    with BUILD_LOG.open("w") as log:
        for mode in ("offline", "online"):
            shutil.rmtree(OUTPUT, ignore_errors=True)  # no stale classes or jars
            args = [mvn, "-q", "-B", *(["-o"] if mode == "offline" else [])]
            args += ["-f", str(SOURCE / "pom.xml"), "package"]
            log.write(f"$ {' '.join(args)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    args, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT_S
                )
            except subprocess.TimeoutExpired:
                log.write(f"(timed out after {BUILD_TIMEOUT_S} s)\n")
                continue
            except OSError as exc:
                raise PeerUnavailable(f"{mvn} did not start: {exc}") from exc
            if done.returncode == 0 and JAR.is_file():
                STAMP.write_text(digest + "\n")
                return Peer(command, version, pom_versions(), mode)
    raise PeerUnavailable(f"the Maven build failed (see {BUILD_LOG})")
