"""What an operator reads: ``--log-format json`` lines from a real server process."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from harness import running_server

from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _lines(text: str) -> list[dict[str, Any]]:
    """Every line of the log, each a JSON object with the four fields every line has."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert RFC3339_MS.match(line["time"]), line
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, line
        assert line["logger"] and isinstance(line["message"], str), line
    return lines


def test_json_lines_say_which_job_execution_instance_and_epoch(
    sqlite_url: str, tmp_path: Path
) -> None:
    with running_server(sqlite_url, tmp_path, "--log-format=json") as server:
        stub = server.stub()
        args = struct_pb2.Struct()
        args.update({"text": "hello from the task"})
        never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
        job = jpb.Job(id="talker", task="test.log", args=args, trigger=never)
        stub.CreateJob(pb.CreateJobRequest(job=job))
        execution = stub.TriggerJob(pb.TriggerJobRequest(id="talker")).execution
        deadline = time.monotonic() + 20
        while stub.GetExecution(pb.GetExecutionRequest(id=execution.id)).execution.state in (
            epb.EXECUTION_STATE_PENDING,
            epb.EXECUTION_STATE_RUNNING,
        ):
            assert time.monotonic() < deadline, "the execution did not end"
            time.sleep(0.05)
        server.stop()
        lines = _lines(server.log)

    instances = {line.get("instance") for line in lines}
    assert len(instances) == 1 and None not in instances, instances
    leading = [line for line in lines if line["message"].startswith("leading (epoch")]
    assert len(leading) == 1, lines
    assert leading[0]["epoch"] >= 1 and leading[0]["instance"].startswith("inst-")
    said = [line for line in lines if line["message"] == "hello from the task"]
    assert len(said) == 1, lines
    caught = [line for line in lines if line["message"] == "the task caught an error"]
    assert len(caught) == 1, lines
    for line in (*said, *caught):
        assert line["job_id"] == "talker"
        assert line["execution_id"] == execution.id
    assert caught[0]["level"] == "ERROR"
    assert "ValueError: hello from the task" in caught[0]["exc_info"]
    # Lines about no execution name none.
    serving = next(line for line in lines if "serving on" in line["message"])
    assert "execution_id" not in serving and serving["epoch"] == leading[0]["epoch"]
