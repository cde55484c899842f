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


# What the client's dependency tree must not hold: the server's storage and timer.
SERVER_ONLY = {"sqlalchemy", "apscheduler", "asyncpg", "alembic", "aiosqlite"}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both distributions built into one directory: the server's and the client's."""
    out = tmp_path_factory.mktemp("wheels")
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
            str(ROOT / "client"),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def wheel(wheels: Path) -> zipfile.ZipFile:
    [path] = wheels.glob("chronoplane-*.whl")
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def client_wheel(wheels: Path) -> zipfile.ZipFile:
    [path] = wheels.glob("chronoplane_client-*.whl")
    return zipfile.ZipFile(path)


def test_everything_installs_under_the_chronoplane_namespace(
    wheel: zipfile.ZipFile, client_wheel: zipfile.ZipFile
) -> None:
    for built in (wheel, client_wheel):
        tops = {name.split("/")[0] for name in built.namelist()}
        assert tops == {"chronoplane", next(t for t in tops if t.endswith(".dist-info"))}
        # A namespace, shared by the two distributions.
        assert "chronoplane/__init__.py" not in built.namelist()
    server, client = set(wheel.namelist()), set(client_wheel.namelist())
    for expected in (
        "chronoplane/server/app.py",
        "chronoplane/server/migrations/env.py",
        "chronoplane/server/migrations/versions/0001_jobs_executions_secrets.py",
        "chronoplane/server/py.typed",
        "chronoplane/celery/__init__.py",
    ):
        assert expected in server
    for expected in (
        "chronoplane/v1/scheduler_service_pb2.py",
        "chronoplane/v1/scheduler_service_pb2_grpc.py",
        "chronoplane/v1/py.typed",
        "chronoplane/client/__init__.py",
        "chronoplane/client/py.typed",
        "chronoplane/client/cli/__init__.py",
    ):
        assert expected in client
    assert not {n for n in server if n.startswith(("chronoplane/client/", "chronoplane/v1/"))}
    assert not {n for n in client | server if "__pycache__" in n}


def _metadata(built: zipfile.ZipFile, name: str) -> str:
    return built.read(
        next(n for n in built.namelist() if n.endswith(f".dist-info/{name}"))
    ).decode()


def test_the_console_scripts_are_declared(
    wheel: zipfile.ZipFile, client_wheel: zipfile.ZipFile
) -> None:
    assert "chronoplane = chronoplane.server.cli:main" in _metadata(wheel, "entry_points.txt")
    assert "chronoctl = chronoplane.client.cli:main" in _metadata(client_wheel, "entry_points.txt")
    assert "Requires-Dist: chronoplane-client==" in _metadata(wheel, "METADATA")


def _install(venv: Path, *requirements: str, find_links: Path) -> None:
    # The venv has no pip of its own (quicker to make): this pip installs into it.
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    subprocess.run(
        [*pip, "install", "-q", "--find-links", str(find_links), *requirements],
        check=True,
        capture_output=True,
    )


def _run(venv: Path, *command: str) -> str:
    done = subprocess.run(
        [str(venv / "bin" / command[0]), *command[1:]], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


DISTRIBUTIONS = (
    "import importlib.metadata as m; print(*(d.metadata['Name'] for d in m.distributions()))"
)


def test_the_client_installs_alone_and_the_server_beside_it(wheels: Path, tmp_path: Path) -> None:
    """A fresh venv with only the client wheel (and its dependencies) runs chronoctl and
    imports the SDK, with no server dependency in the tree; the server's wheel then joins
    it in the same namespace."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [client] = wheels.glob("chronoplane_client-*.whl")
    _install(venv, str(client), find_links=wheels)
    installed = {name.lower() for name in _run(venv, "python", "-c", DISTRIBUTIONS).split()}
    assert {"chronoplane-client", "grpcio", "grpcio-status", "protobuf"} <= installed
    assert not installed & (SERVER_ONLY | {"chronoplane", "pyyaml"}), installed
    assert "usage: chronoctl" in _run(venv, "chronoctl", "--help")
    imported = "import chronoplane.client as c; print(c.Client.__name__, c.Job.__name__)"
    assert _run(venv, "python", "-c", imported).split() == ["Client", "Job"]
    missing = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import chronoplane.server"], capture_output=True
    )
    assert b"No module named 'chronoplane.server'" in missing.stderr

    [server] = wheels.glob("chronoplane-*.whl")
    _install(venv, str(server), find_links=wheels)
    assert "usage: chronoplane" in _run(venv, "chronoplane", "--help")
    found = (
        "from chronoplane.server.storage.migrate import migrations_path; print(migrations_path())"
    )
    assert (Path(_run(venv, "python", "-c", found).strip()) / "env.py").is_file()


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
