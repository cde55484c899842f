"""The TypeScript client (clients/typescript): its generated code is what `make proto` makes
now, it compiles, and its `node --test` suite passes against a real `chronoplane serve`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import BIN, ROOT, start_server

TS = ROOT / "clients" / "typescript"
GENERATED = Path("clients/typescript/src/gen")
NODE_HELP = (
    "the TypeScript client's tests need Node.js 20 or newer with npm on PATH "
    "(Debian/Ubuntu: apt-get install nodejs npm; or a release from nodejs.org)"
)


def run(command: list[str], *, cwd: Path, timeout: float) -> str:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the package's node_modules installed as package-lock.json says."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(NODE_HELP)
    version = run([node, "--version"], cwd=TS, timeout=10).strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.fail(f"node is {version}: {NODE_HELP}")
    installed = TS / "node_modules" / ".package-lock.json"
    lock = TS / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        run([npm, "ci", "--no-audit", "--no-fund"], cwd=TS, timeout=300)
    return node


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_code_is_fresh(node: str, tmp_path: Path) -> None:
    template = str(GENERATED.parents[1] / "buf.gen.yaml")
    run(
        [str(BIN / "buf"), "generate", "--template", template, "--output", str(tmp_path)],
        cwd=ROOT,
        timeout=60,
    )
    fresh, committed = files(tmp_path / GENERATED), files(ROOT / GENERATED)
    assert fresh, "buf generate wrote nothing"
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, (
        f"{GENERATED} is stale ({', '.join(stale)}): run 'make proto' and commit the result"
    )


def test_node_suite_against_a_server(node: str, sqlite_url: str, tmp_path: Path) -> None:
    # The client does not see the database, so one backend is enough here.
    run([node, "node_modules/typescript/bin/tsc", "-p", "."], cwd=TS, timeout=60)
    server = start_server(sqlite_url, tmp_path)
    try:
        result = subprocess.run(
            [node, "--test", "dist/test/client.test.js"],
            cwd=TS,
            env=dict(os.environ, CHRONOPLANE_ADDRESS=server.address),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.stop()
    report = f"{result.stdout}\n{result.stderr}\nserver log:\n{server.log[-5000:]}"
    assert result.returncode == 0, report
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.MULTILINE)
    assert passed and int(passed.group(1)) >= 7, report
