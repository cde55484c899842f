"""``chronoctl --json`` prints what grpcurl prints for the same call (proto3 JSON, camelCase,
enums by name, a job or execution inside its response's envelope, whole numbers as
integers); ``jobs delete`` says what it deleted; ``chronoplane token create --help`` lists
its own flags only. Against a real server, with the real grpcurl."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import BIN, ServerProcess, start_server

SERVICE = "chronoplane.v1.SchedulerService"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("shapes")
    running = start_server(f"sqlite+aiosqlite:///{workdir}/chronoplane.db", workdir)
    try:
        yield running
    finally:
        running.stop()


def chronoctl(server: ServerProcess, *args: str) -> str:
    ran = subprocess.run(
        [str(BIN / "chronoctl"), "--address", server.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def grpcurl(server: ServerProcess, method: str, request: dict[str, Any]) -> Any:
    ran = subprocess.run(
        [
            str(BIN / "grpcurl"),
            "-plaintext",
            "-d",
            json.dumps(request),
            server.address,
            f"{SERVICE}/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return json.loads(ran.stdout)


def as_json(text: str) -> Any:
    assert ".0," not in text and ".0\n" not in text, f"a whole number printed as a float:\n{text}"
    return json.loads(text)


def finished(server: ServerProcess, execution_id: str) -> None:
    for _ in range(300):
        got = grpcurl(server, "GetExecution", {"id": execution_id})["execution"]
        if "endTime" in got:
            return
        time.sleep(0.05)
    raise AssertionError(f"{execution_id} did not finish")


def test_chronoctl_json_is_what_grpcurl_prints(server: ServerProcess) -> None:
    created = as_json(
        chronoctl(
            server,
            "--json",
            "jobs",
            "create",
            "shapes",
            "--task",
            "chronoplane.echo",
            "--cron",
            "0 3 * * *",
            "--args",
            '{"n": 1, "x": 1.5}',
            "--max-attempts",
            "2",
        )
    )
    assert created == grpcurl(server, "GetJob", {"id": "shapes"})
    assert created["job"]["args"] == {"n": 1, "x": 1.5}
    assert created["job"]["misfirePolicy"] == "MISFIRE_POLICY_RUN_ONCE"
    got = as_json(chronoctl(server, "jobs", "get", "shapes", "--json"))
    assert got == created
    assert as_json(chronoctl(server, "--json", "jobs", "list")) == grpcurl(server, "ListJobs", {})
    triggered = as_json(chronoctl(server, "--json", "jobs", "trigger", "shapes"))
    assert set(triggered) == {"execution"}
    execution_id = triggered["execution"]["id"]
    finished(server, execution_id)
    assert as_json(chronoctl(server, "--json", "executions", "get", execution_id)) == grpcurl(
        server, "GetExecution", {"id": execution_id}
    )
    assert as_json(chronoctl(server, "--json", "executions", "list", "--job", "shapes")) == grpcurl(
        server, "ListExecutions", {"jobId": "shapes"}
    )
    assert as_json(chronoctl(server, "--json", "tasks")) == grpcurl(server, "ListTasks", {})
    paused = as_json(chronoctl(server, "--json", "jobs", "pause", "shapes"))
    assert paused == grpcurl(server, "GetJob", {"id": "shapes"})
    assert as_json(chronoctl(server, "--json", "jobs", "delete", "shapes")) == {}


def test_what_jobs_get_prints_can_be_applied_back(server: ServerProcess, tmp_path: Path) -> None:
    chronoctl(server, "jobs", "create", "kept", "--task", "chronoplane.echo", "--every", "1h")
    printed = as_json(chronoctl(server, "--json", "jobs", "get", "kept"))
    printed["job"]["trigger"] = {"interval": {"every": "7200s"}}
    one, listed = tmp_path / "one.json", tmp_path / "listed.json"
    one.write_text(json.dumps(printed))
    listed.write_text(json.dumps([printed]))
    assert chronoctl(server, "jobs", "apply", "-f", str(one)).splitlines() == [
        "update  kept  (trigger)",
        "0 created, 1 updated, 0 deleted, 0 unchanged",
    ]
    applied = chronoctl(server, "jobs", "apply", "-f", str(listed))
    assert applied == "0 created, 0 updated, 0 deleted, 1 unchanged\n"


def test_jobs_delete_says_what_it_deleted(server: ServerProcess) -> None:
    chronoctl(server, "jobs", "create", "doomed", "--task", "chronoplane.echo", "--every", "1h")
    printed = chronoctl(server, "jobs", "delete", "doomed")
    assert printed == "deleted job doomed and its execution history\n"


def test_token_create_help_lists_only_its_own_flags() -> None:
    ran = subprocess.run(
        [str(BIN / "chronoplane"), "token", "create", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    flags = {word.rstrip(",") for word in ran.stdout.split() if word.startswith("--")}
    assert flags == {"--help", "--name", "--role", "--expires-in", "--config", "--database-url"}
