"""The README's console blocks as steps to run, and how their shown output is compared with
what the commands print now (test_readme.py).

A block is a fenced ``console`` block: ``$ command`` lines (a quoted argument or a heredoc
may go on over several lines), each followed by the output it shows. An HTML comment on the
line before the fence says how to run it:

- ``<!-- readme-test: skip ... -->``: not run (``make run``: the test starts the server);
- ``<!-- readme-test: background -->``: its one command runs while the next block's do, then
  gets Ctrl-C (a watch that shows what the next block does).

A command whose output ends with ``^C`` gets Ctrl-C after a moment. ``<the id above>`` in a
command is the first execution id the latest command that printed one printed;
``<the first cursor above>`` likewise for watch cursors.

Outputs are compared field by field: JSON documents parsed (a ``…`` line in an object says
that fields were left out), text line by line with times, ids, durations and watch cursors
masked and runs of spaces collapsed; tables column by column, leaving out the volatile ones.

``python tests/readme.py`` prints what the tour's commands print now (reads again until they
match, as the test does), to paste.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
EXECUTION_ID = re.compile(r"\b01[0-9a-f]{26}\b")
INSTANCE_ID = re.compile(r"\binst-[0-9a-f]{12}\b")
DURATION = re.compile(r"\b\d+\.\d+m?s\b|(?<=^duration: )\S+|(?<=waiting )\S+$")
WATCH_LINE = re.compile(r"^\s*\d+(?=\s+(added|modified|deleted|current|progress|\(the))")
# JSON keys whose values change from run to run (times and ids are masked by their form).
VOLATILE_KEYS = {"etag", "cursor", "nextPageToken", "duration"}
# Table columns whose cells change from run to run.
VOLATILE_COLUMNS = {"ID", "NEXT RUN", "SCHEDULED", "DURATION", "INSTANCE", "NAME", "ADDRESS"}
VOLATILE_COLUMNS |= {"LAST SEEN"}
ELIDED = "…"


@dataclass
class Step:
    command: str
    expected: str = ""

    @property
    def interrupted(self) -> bool:
        return self.expected.rstrip().endswith("^C")


@dataclass
class Block:
    line: int
    marker: str
    steps: list[Step] = field(default_factory=list)


def section(text: str, heading: str) -> str:
    """From the heading to the next heading of its level."""
    start = text.index(heading + "\n")
    level = heading.split(" ")[0] + " "
    end = text.find("\n" + level, start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def fenced(text: str, language: str) -> Iterator[tuple[int, str, str]]:
    """(line number, the comment marker before it, body) of each block in that language."""
    for match in re.finditer(rf"^```{language}\n(.*?)^```$", text, re.S | re.M):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = re.fullmatch(r"<!-- readme-test: (\w+).*-->", before.strip())
        line = text[: match.start()].count("\n") + 1
        yield line, marker.group(1) if marker else "", match.group(1)


def blocks(text: str) -> list[Block]:
    return [Block(line, marker, steps(body)) for line, marker, body in fenced(text, "console")]


def steps(body: str) -> list[Step]:
    found: list[Step] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            if not found:
                raise ValueError(f"output before any command: {lines[i]!r}")
            found[-1].expected += lines[i] + "\n"
            i += 1
            continue
        command, i = _command(lines, i)
        found.append(Step(command))
    return found


def _command(lines: list[str], i: int) -> tuple[str, int]:
    """A command from line i on: up to its heredoc's end, or until its quotes close."""
    text = lines[i][2:]
    i += 1
    heredoc = re.search(r"<<'?(\w+)'?", text)
    if heredoc:
        while lines[i - 1] != heredoc.group(1):
            text += "\n" + lines[i]
            i += 1
        return text, i
    while _open_quote(text):
        text += "\n" + lines[i]
        i += 1
    return text, i


def _open_quote(text: str) -> bool:
    quote = ""
    for char in text:
        if quote and char == quote:
            quote = ""
        elif not quote and char in "'\"":
            quote = char
    return bool(quote)


# -- comparing ------------------------------------------------------------------------------


def differences(expected: str, actual: str) -> list[str]:
    """What differs, in words; nothing if the shown output is what was printed."""
    expected = "\n".join(line for line in expected.splitlines() if line.strip() != "^C")
    if expected.lstrip().startswith("{"):
        try:
            shown = documents(expected, elided=True)
        except ValueError as error:
            return [f"the README's JSON does not parse: {error}"]
        try:
            printed = documents(actual, elided=False)
        except ValueError:
            return [f"printed no JSON but:\n{actual}"]
        if len(shown) != len(printed):
            return [f"{len(shown)} JSON documents shown, {len(printed)} printed:\n{actual}"]
        return [d for s, p in zip(shown, printed, strict=True) for d in same(s, p, "")]
    return text_differences(expected, actual)


def documents(text: str, *, elided: bool) -> list[Any]:
    if elided:
        text = _elisions_as_keys(text)
    decoder = json.JSONDecoder()
    found, at = [], 0
    while at < len(text.rstrip()):
        while text[at].isspace():
            at += 1
        value, at = decoder.raw_decode(text, at)
        found.append(value)
    return found


def _elisions_as_keys(text: str) -> str:
    """A ``…`` line becomes a ``"…": true`` member (commas put right)."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.strip() == ELIDED:
            if lines and not lines[-1].rstrip().endswith((",", "{", "[")):
                lines[-1] += ","
            line = f'"{ELIDED}": true,'
        lines.append(line)
    return re.sub(r",(\s*[}\]])", r"\1", "\n".join(lines))


def same(shown: Any, printed: Any, path: str) -> list[str]:
    if isinstance(shown, dict) and isinstance(printed, dict):
        keys = set(shown) - {ELIDED}
        problems = [f"{path}.{key}: shown, not printed" for key in sorted(keys - set(printed))]
        if ELIDED not in shown:
            extra = sorted(set(printed) - keys)
            problems += [f"{path}.{key}: printed ({printed[key]!r}), not shown" for key in extra]
        for key in sorted(keys & set(printed)):
            if key not in VOLATILE_KEYS:
                problems += same(shown[key], printed[key], f"{path}.{key}")
        return problems
    if isinstance(shown, list) and isinstance(printed, list):
        if len(shown) != len(printed):
            return [f"{path}: {len(shown)} items shown, {len(printed)} printed: {printed!r}"]
        pairs = enumerate(zip(shown, printed, strict=True))
        return [d for n, (s, p) in pairs for d in same(s, p, f"{path}[{n}]")]
    if isinstance(shown, str) and isinstance(printed, str):
        shown, printed = mask(shown), mask(printed)
    if shown != printed or isinstance(shown, bool) != isinstance(printed, bool):
        return [f"{path}: shown {shown!r}, printed {printed!r}"]
    return []


def mask(text: str) -> str:
    text = TIME.sub("<time>", text)
    text = EXECUTION_ID.sub("<execution>", text)
    text = INSTANCE_ID.sub("<instance>", text)
    text = DURATION.sub("<duration>", text)
    return WATCH_LINE.sub("<cursor>", text)


def text_differences(expected: str, actual: str) -> list[str]:
    shown, printed = _rows(expected), _rows(actual)
    if len(shown) != len(printed):
        return [f"{len(shown)} lines shown, {len(printed)} printed:\n{actual}"]
    return [f"shown {s!r}\nprinted {p!r}" for s, p in zip(shown, printed, strict=True) if s != p]


def _rows(text: str) -> list[str]:
    """Each line masked, spaces collapsed; a table's rows as their stable columns."""
    rows: list[str] = []
    columns: list[tuple[str, int, int]] = []
    for line in text.strip("\n").splitlines():
        if not line.strip():
            columns = []
        elif _is_header(line):
            columns = _columns(line)
        if columns and line.strip():
            cells = [line[start:end].strip() for name, start, end in columns]
            names = [name for name, _, _ in columns]
            line = " | ".join(
                c for c, n in zip(cells, names, strict=True) if n not in VOLATILE_COLUMNS
            )
        rows.append(mask(" ".join(line.split())))
    return rows


def _is_header(line: str) -> bool:
    cells = re.split(r"\s{2,}", line.strip())
    return len(cells) >= 3 and all(re.fullmatch(r"[A-Z][A-Z ]*", cell) for cell in cells)


def _columns(header: str) -> list[tuple[str, int, int]]:
    starts = [(m.group(0), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for _, start in starts[1:]] + [10_000]
    return [(name, start, end) for (name, start), end in zip(starts, ends, strict=True)]


# -- running --------------------------------------------------------------------------------

SHOWN_ADDRESSES = ("localhost:50051", "127.0.0.1:50051")
PLACEHOLDERS = {"<the id above>": "ids", "<the first cursor above>": "cursors"}
# Commands that only read: run again (for up to RETRY seconds) until they print what is shown,
# since what a schedule did by now depends on the machine's speed.
READS = re.compile(
    r"SchedulerService/(List|Get|Preview)"
    r"|^chronoctl (jobs (list|get)|executions (list|get)|status|tasks|preview|instances)\b"
)
RETRY = 12.0
INTERRUPT_AFTER = 1.5


@dataclass
class Tour:
    """Runs the steps in ``workdir`` against the server at ``address``, as a reader would."""

    workdir: Path
    address: str
    bin: Path
    ids: list[str] = field(default_factory=list)
    cursors: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        path = f"{self.bin}{os.pathsep}{os.environ['PATH']}"
        return dict(os.environ, PATH=path, CHRONOPLANE_ADDRESS=self.address)

    def command(self, step: Step) -> str:
        text = step.command
        for shown in SHOWN_ADDRESSES:
            text = text.replace(shown, self.address)
        for placeholder, source in PLACEHOLDERS.items():
            if placeholder in text:
                values = getattr(self, source)
                assert values, f"{placeholder} in {step.command!r}, but nothing printed one"
                text = text.replace(placeholder, values[0])
        return text

    def start(self, step: Step) -> Any:
        return subprocess.Popen(
            ["bash", "-c", self.command(step)],
            cwd=self.workdir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # Ctrl-C as a terminal gives it, even when the tests themselves were started in
            # the background by a shell, which leaves SIGINT ignored for all its children.
            preexec_fn=_default_sigint,
        )

    def finish(self, process: Any, *, interrupt: bool) -> str:
        if interrupt:
            os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=30)
        return self.printed(output)

    def run(self, step: Step) -> str:
        process = self.start(step)
        if step.interrupted:
            time.sleep(INTERRUPT_AFTER)
        return self.finish(process, interrupt=step.interrupted)

    def printed(self, output: str) -> str:
        """The output as the README would show it; what it names is kept for later steps."""
        output = output.replace(self.address, SHOWN_ADDRESSES[1])
        if ids := EXECUTION_ID.findall(output):
            self.ids = ids
        cursors = re.findall(r'"cursor": "(\d+)"', output) + [
            m.group(0).strip() for line in output.splitlines() if (m := WATCH_LINE.match(line))
        ]
        if cursors:
            self.cursors = cursors
        return output


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def walk(tour: Tour, found: list[Block], *, retry: bool) -> Iterator[tuple[Block, Step, str]]:
    """Each step with what it printed, in order; a background block's step comes after the
    next block's. With ``retry``, reads are run again until they print what is shown."""
    waiting: tuple[Block, Any] | None = None
    for block in found:
        if block.marker == "skip":
            continue
        if block.marker == "background":
            assert len(block.steps) == 1, f"README line {block.line}: one command in background"
            waiting = (block, tour.start(block.steps[0]))
            time.sleep(1.5)  # the watch is registered before the next block changes things
            continue
        for step in block.steps:
            output = tour.run(step)
            deadline = time.monotonic() + RETRY
            while retry and READS.search(step.command) and time.monotonic() < deadline:
                if not differences(step.expected, output):
                    break
                time.sleep(0.3)
                output = tour.run(step)
            yield block, step, output
        if waiting is not None:
            time.sleep(1.0)
            background, process = waiting
            yield background, background.steps[0], tour.finish(process, interrupt=True)
            waiting = None


def main() -> None:
    """Runs the tour against a fresh server and prints what each command printed."""
    from harness import BIN, free_port

    with tempfile.TemporaryDirectory() as workdir:
        tour = Tour(Path(workdir), f"127.0.0.1:{free_port()}", BIN)
        server = subprocess.Popen(
            [str(BIN / "chronoplane"), "serve", "--address", tour.address],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(3)
            tour_text = section(README.read_text(), "## A five-minute tour")
            for block, step, output in walk(tour, blocks(tour_text), retry=True):
                sys.stdout.write(f"--- README line {block.line}\n$ {step.command}\n{output}")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
