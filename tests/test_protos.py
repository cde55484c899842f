"""The API's files are enough for a client in any language: the error messages the server
sends (google.rpc.Status and its details) resolve from proto/ alone (vendored googleapis
files, proto/google/README.md), as buf builds them for every generator."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from google.protobuf import descriptor_pb2
from harness import BIN, ROOT


def built_messages(tmp_path: Path) -> set[str]:
    image = tmp_path / "image.binpb"
    subprocess.run([str(BIN / "buf"), "build", "-o", str(image)], cwd=ROOT, check=True, timeout=120)
    files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file
    return {f"{file.package}.{message.name}" for file in files for message in file.message_type}


def test_every_error_detail_the_server_sends_is_in_the_api_s_files(tmp_path: Path) -> None:
    sent = {
        f"google.rpc.{name}"
        for path in (ROOT / "server").rglob("*.py")
        for name in re.findall(r"error_details_pb2\.([A-Z]\w+)\(", path.read_text())
    }
    assert "google.rpc.BadRequest" in sent and "google.rpc.ErrorInfo" in sent
    messages = built_messages(tmp_path)
    assert "google.rpc.Status" in messages
    assert sent <= messages, sorted(sent - messages)
