"""What users install: one `chronoplane` namespace, migrations inside, nothing bare."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from harness import ROOT

PUBLIC_MODULES = [
    "chronoplane.server.errors",
    "chronoplane.server.models",
    "chronoplane.server.tasks",
    "chronoplane.server.service",
    "chronoplane.server.runner",
    "chronoplane.server.storage.abc",
    "chronoplane.server.storage.sqlalchemy",
    "chronoplane.server.engine.abc",
    "chronoplane.server.engine.apscheduler",
    "chronoplane.server.executors.abc",
    "chronoplane.server.executors.inline",
    "chronoplane.server.coordination.abc",
    "chronoplane.server.transport.errors",
    "chronoplane.server.transport.convert",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [path] = out.glob("chronoplane-*.whl")
    return zipfile.ZipFile(path)


def test_everything_installs_under_the_chronoplane_namespace(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"chronoplane", next(t for t in tops if t.endswith(".dist-info"))}
    names = set(wheel.namelist())
    for expected in (
        "chronoplane/v1/scheduler_service_pb2.py",
        "chronoplane/v1/scheduler_service_pb2_grpc.py",
        "chronoplane/server/app.py",
        "chronoplane/client/__init__.py",
        "chronoplane/server/migrations/env.py",
        "chronoplane/server/migrations/versions/0001_jobs_executions_secrets.py",
        "chronoplane/server/py.typed",
    ):
        assert expected in names
    assert "chronoplane/__init__.py" not in names  # a namespace, shared by client and server


def test_the_console_script_is_declared(wheel: zipfile.ZipFile) -> None:
    entry_points = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "chronoplane = chronoplane.server.cli:main" in wheel.read(entry_points).decode()


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_all_lists_exactly_the_public_names(module: str) -> None:
    loaded = importlib.import_module(module)
    declared = set(loaded.__all__)
    defined = {
        name
        for name, value in vars(loaded).items()
        if not name.startswith("_")
        and getattr(value, "__module__", module) == module
        and (callable(value) or isinstance(value, type))
    }
    assert defined <= declared, f"public but not in __all__: {defined - declared}"
    assert all(hasattr(loaded, name) for name in declared)


def test_migrations_are_found_from_a_checkout() -> None:
    from chronoplane.server.storage.migrate import migrations_path

    assert migrations_path() == Path(ROOT / "migrations")
