"""The README runs as written: the tour's console blocks top to bottom against a fresh server
started as ``make run`` starts it, the Python snippet with the client as it is now, and
"Your own tasks" in a directory holding ``myapp/tasks.py`` (how blocks are read and outputs
compared: readme.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from harness import BIN, ServerProcess, free_port, wait_serving
from readme import README, Tour, blocks, differences, fenced, section, walk

from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

TEXT = README.read_text()
TOUR = section(TEXT, "## A five-minute tour")
OWN_TASKS = section(TEXT, "## Your own tasks")
FROM_PYTHON = section(TEXT, "## From Python")
# A datetime as the SDK prints one: aware, in UTC.
PRINTED_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?\+00:00")


def serve(workdir: Path, *args: str) -> ServerProcess:
    """``chronoplane serve`` as the README runs it (a free port instead of 50051)."""
    address = f"127.0.0.1:{free_port()}"
    log_path = workdir.parent / f"{workdir.name}-server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(BIN / "chronoplane"), "serve", *args, "--address", address],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = ServerProcess(process, address, log_path)
    wait_serving(server)
    return server


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    workdir = tmp_path / "tour"
    workdir.mkdir()
    server = serve(workdir)
    try:
        yield server
    finally:
        server.stop()


def test_the_tour_runs_top_to_bottom_and_prints_what_it_shows(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    tour = Tour(tmp_path / "tour", fresh_server.address, BIN)
    found = blocks(TOUR)
    assert sum(len(b.steps) for b in found if b.marker != "skip") >= 30
    assert [b.marker for b in found if b.marker == "skip"] == ["skip"], "only make run"
    problems = [
        f"README line {block.line}: $ {step.command}\n  " + "\n  ".join(found_differences)
        for block, step, printed in walk(tour, found, retry=True)
        if (found_differences := differences(step.expected, printed))
    ]
    assert not problems, "\n\n".join(problems) + f"\n\nserver log:\n{fresh_server.log[-3000:]}"


def test_the_python_snippet_runs_with_the_client_as_it_is(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    (snippet,) = [body for _, _, body in fenced(TOUR, "python")]
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("127.0.0.1:50051", fresh_server.address))
    ran = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert re.fullmatch(r"from-python 01[0-9a-f]{26}\n", ran.stdout), ran.stdout
    execution_id = ran.stdout.split()[1]
    stub = fresh_server.stub()
    got = stub.GetExecution(pb.GetExecutionRequest(id=execution_id)).execution
    assert got.job_id == "from-python" and dict(got.args) == {"n": 1}


def test_the_sdk_example_prints_what_the_readme_shows(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    """The first example of "From Python", with its output (times aside)."""
    found = re.search(r"^```python\n(.*?)^```\n.*?^```\n(.*?)^```$", FROM_PYTHON, re.S | re.M)
    assert found, "no example with its output"
    example, shown = found.groups()
    script = tmp_path / "example.py"
    script.write_text(example.replace("127.0.0.1:50051", fresh_server.address))
    ran = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert (
        PRINTED_TIME.sub("<time>", ran.stdout).strip() == PRINTED_TIME.sub("<time>", shown).strip()
    )


def test_your_own_tasks_work_as_written(tmp_path: Path) -> None:
    (module,) = [b for _, _, b in fenced(OWN_TASKS, "python") if b.startswith("# myapp/tasks.py")]
    (command,) = [b for _, _, b in fenced(OWN_TASKS, "console")]
    argv = command.split("#")[0].split()
    assert argv[:2] == ["chronoplane", "serve"], command
    empty = tmp_path / "empty"
    empty.mkdir()
    # Where there is no myapp: one line naming the flag, no traceback.
    missing = subprocess.run(
        [str(BIN / "chronoplane"), *argv[1:]],
        cwd=empty,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr == "chronoplane: --tasks myapp.tasks: no module named 'myapp'\n"
    # Where there is: found in the working directory, no PYTHONPATH needed.
    app = tmp_path / "app"
    (app / "myapp").mkdir(parents=True)
    (app / "myapp" / "tasks.py").write_text(module)
    server = serve(app, *argv[2:])
    try:
        stub = server.stub()
        job = jpb.Job(
            id="daily",
            task="reports.daily",
            trigger=jpb.Trigger(cron=jpb.CronTrigger(expression="0 6 * * *")),
        )
        stub.CreateJob(pb.CreateJobRequest(job=job))
        execution = stub.TriggerJob(pb.TriggerJobRequest(id="daily")).execution
        for _ in range(300):
            got = stub.GetExecution(pb.GetExecutionRequest(id=execution.id)).execution
            if got.HasField("end_time"):
                break
            time.sleep(0.05)
        assert json_format.MessageToDict(got.result) == {"rows": 1234}, got
    finally:
        server.stop()
