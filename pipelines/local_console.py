"""What ``kiln run`` shows while kfp.local runs the pipeline: one line per step, a progress
bar for training, and on failure the failing step's own error.

kfp.local (2.17) writes everything to ``sys.stdout``: its task log lines
(``HH:MM:SS.mmm - INFO - Executing task 'train'``) through a handler it installs on the
root logger around each task, and each step's output (stdout and stderr of the
``SubprocessRunner`` child, merged) with ``print``, indented by four spaces. Cache hits
are INFO records on the root logger *outside* those contexts, so they reach only
handlers the caller installed. :func:`capture` therefore

- points ``sys.stdout``/``sys.stderr`` at a tap that appends to the run's log file and
  hands every line to :class:`StepView`,
- adds a root-logger handler (INFO) writing in kfp's own format to the same tap,
- redirects file descriptors 1 and 2 to the log file, for anything written below Python.

The patterns below are kfp.local's message formats; tests/code/test_cli_run_console.py
runs a real kfp.local pipeline against them, so an SDK change that breaks them fails there.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kiln import progress

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} - (?P<level>[A-Z]+) - (?P<message>.*)$")
EXECUTING = re.compile(r"^Executing task '(?P<task>[^']+)'$")
FINISHED = re.compile(r"^Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)$")
CACHE_HIT = re.compile(r"^Task (?P<task>\S+) cache hit \(key=[0-9a-f]+\); skipping execution\.$")
EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*): (?P<message>.+)$")
STEP_INDENT = " " * 4  # kfp.local's indented_print around a task's output
LOG_FORMAT = "%(asctime)s.%(msecs)03d - %(levelname)s - %(message)s"  # kfp.local's MillisecondFormatter
NAME_WIDTH = 10


def step_error(lines: list[str]) -> str | None:
    """The exception line (``Type: message``) of the last Python traceback in a step's
    output, the module path dropped from the type; None when there is no traceback."""
    starts = [i for i, line in enumerate(lines) if line.strip() == "Traceback (most recent call last):"]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        text = line.removeprefix(STEP_INDENT)
        if text[:1].isspace() or not text.strip():
            continue  # a frame of the traceback
        match = EXCEPTION_LINE.match(text.strip())
        if match:
            return f"{match['type'].rsplit('.', 1)[-1]}: {match['message']}"
        return text.strip()
    return None


@dataclass
class _Step:
    name: str
    started: float
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    bar: Any = None


class StepView:
    """Turns kfp.local's stream into one line per step on ``out``.

    ``uncached``: steps that never use the cache (shown as ``ran``, not ``cache miss``;
    with ``caching`` off, every step).
    ``tty``: a terminal gets a live line per step and a tqdm bar for progress records;
    anything else gets each step's line written as it starts and completed as it ends.
    """

    def __init__(self, out: TextIO, uncached: set[str] | frozenset[str] = frozenset(), caching: bool = True,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.uncached, self.caching, self.clock = out, set(uncached), caching, clock
        self.tty = out.isatty() if tty is None else tty
        self.current: _Step | None = None
        self.failed: dict[str, str | None] = {}
        self.finished: list[tuple[str, str]] = []

    def feed(self, raw: str) -> None:
        """Take one line of the stream (ANSI colours allowed, no newline)."""
        line = ANSI.sub("", raw)
        match = LOG_LINE.match(line)
        if match is None:
            self._step_output(line)
            return
        message = match["message"]
        if event := EXECUTING.match(message):
            self._start(event["task"])
        elif event := FINISHED.match(message):
            self._end(event["task"], event["status"])
        elif event := CACHE_HIT.match(message):
            self._line(event["task"], "cache hit", 0.0)

    def _step_output(self, line: str) -> None:
        if self.current is None:
            return
        self.current.lines.append(line)
        record = progress.parse(line)
        if record is not None and self.tty:
            self._progress(record)

    def _start(self, task: str) -> None:
        if self.current is not None and self.current.name == task:
            return  # a retry: the same line goes on
        self.current = _Step(task, self.clock())
        self.out.write(f"  {task:<{NAME_WIDTH}} " + ("running" if self.tty else ""))
        self.out.flush()

    def _progress(self, record: dict[str, Any]) -> None:
        from tqdm import tqdm

        step = self.current
        if step.bar is None:
            self.out.write("\r\x1b[K")
            step.bar = tqdm(total=int(record["of"]), desc=f"  {step.name:<{NAME_WIDTH}}", unit=record.get("unit", "it"),
                            file=self.out, leave=False, dynamic_ncols=True,
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]")
        step.bar.update(int(record["n"]) - step.bar.n)
        extra = {k: v for k, v in record.items() if k not in {"step", "n", "of", "unit"}}
        if extra:
            step.bar.set_postfix(extra, refresh=True)

    def _end(self, task: str, status: str) -> None:
        step = self.current if self.current is not None and self.current.name == task else _Step(task, self.clock())
        self.current = None
        if step.bar is not None:
            step.bar.close()
        if status != "SUCCESS":
            self.failed[task] = step_error(list(step.lines))
        cached = self.caching and task not in self.uncached
        outcome = "FAILED" if status != "SUCCESS" else ("cache miss" if cached else "ran")
        self._line(task, outcome, self.clock() - step.started, started=True)

    def _line(self, task: str, outcome: str, seconds: float, started: bool = False) -> None:
        head = ("\r\x1b[K" if self.tty else "") + (f"  {task:<{NAME_WIDTH}} " if self.tty or not started else "")
        self.out.write(f"{head}{outcome:<10} {_duration(seconds):>7}\n")
        self.out.flush()
        self.finished.append((task, outcome))

    def close(self) -> None:
        """End a step line left open (the run stopped inside a step)."""
        if self.current is not None:
            if self.current.bar is not None:
                self.current.bar.close()
            self.out.write("\n")
            self.current = None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


class _Tap(io.TextIOBase):
    """A text stream that appends to the log and hands each complete line to ``on_line``
    (and, with ``echo``, copies everything there too: ``kiln run -v``)."""

    def __init__(self, log: TextIO, on_line: Callable[[str], None], echo: TextIO | None = None) -> None:
        self.log, self.on_line, self.echo = log, on_line, echo
        self.pending = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.log.fileno()

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.echo is not None:
            self.echo.write(text)
        *complete, self.pending = (self.pending + text).split("\n")
        for line in complete:
            self.on_line(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def release(self, to: TextIO) -> None:
        """After the capture: write straight to ``to``. Libraries that took ``sys.stderr``
        while it was this tap (DVC's log handlers, for one) keep writing here, and the log
        file is closed by then."""
        self.log, self.echo, self.on_line = to, None, lambda line: None


def console_stream() -> TextIO:
    """Where the person at the terminal reads: a duplicate of the current stdout's file
    descriptor (so it survives fd 1 pointing at the log), or ``sys.stdout`` itself when it
    has none (a test's capture)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return sys.stdout
    sys.stdout.flush()
    return open(os.dup(fd), "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8",
                errors="replace")


@contextmanager
def capture(log_path: Path, on_line: Callable[[str], None], echo: TextIO | None = None) -> Iterator[None]:
    """Send everything written in this context (Python streams, root-logger records at
    INFO, file descriptors 1 and 2) to ``log_path``, line by line through ``on_line``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with open(log_path, "a", buffering=1, encoding="utf-8", errors="replace") as log:
        tap = _Tap(log, on_line, echo)
        handler = logging.StreamHandler(tap)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        saved_level, saved_streams = root.level, (sys.stdout, sys.stderr)
        for stream in saved_streams:
            stream.flush()
        saved_fds = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = sys.stderr = tap
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(saved_level)
            sys.stdout, sys.stderr = saved_streams
            tap.flush()
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            if tap.pending:
                on_line(tap.pending)
            tap.release(saved_streams[1])
