"""The trainer's output on the launcher's console: copied to its log whole, shown without tracebacks and
torchrun's failure report (the launcher prints one line instead, naming the log and its last error)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

__all__ = ["ConsoleFilter", "console_stream", "last_error_line", "pump"]


class _TextConsole:
    """Bytes onto a text stream that has no binary buffer (a notebook's ``sys.stderr``)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode(errors="replace"))

    def flush(self) -> None:
        self.stream.flush()


def console_stream() -> IO[bytes]:
    """Where the trainer's output goes: stderr's bytes (stderr itself when it has none)."""
    stream = sys.stderr
    return stream.buffer if hasattr(stream, "buffer") else _TextConsole(stream)  # type: ignore[return-value]


def last_error_line(path: Path, tail_bytes: int = 65536) -> str:
    """The last line of a log that names an error (a logged ERROR or an exception), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        text = line.strip()
        if (" ERROR " in text or "Error:" in text or "Exception:" in text) and "ChildFailedError" not in text:
            return text if len(text) <= 300 else text[:297] + "..."
    return ""


class ConsoleFilter:
    """Decides which of the trainer's output lines reach the console: everything but Python tracebacks and
    torchrun's failure report (they stay in the log; the launcher prints one line instead)."""

    _TB_CONTINUE = ("Traceback (most recent call last)", "During handling of", "The above exception")

    def __init__(self) -> None:
        self.in_traceback = False
        self.muted = False  # torchrun reports a failure: the rest is its report and its teardown

    def keep(self, line: str) -> bool:
        text = line.rstrip("\r\n")
        if self.muted:
            return False
        if (
            "torch.distributed.elastic" in text
            or "torch/distributed/elastic" in text
            or text.startswith("=====")
        ):
            self.muted = True
            return False
        if text.startswith(self._TB_CONTINUE):
            self.in_traceback = True
            return False
        if self.in_traceback:
            if not text or text[0].isspace() or text.startswith("^"):
                return False
            self.in_traceback = False  # the exception line closes the traceback
            return False
        return True


def pump(stream: IO[bytes], log_path: Path, console: IO[bytes]) -> None:
    """Copy a child's output into its log, and the lines ``ConsoleFilter`` keeps onto the console (a
    ``\r`` ends a line too, so progress bars keep moving)."""
    keep = ConsoleFilter()
    pending = b""
    with open(log_path, "ab") as log_file:
        while chunk := os.read(stream.fileno(), 65536):
            log_file.write(chunk)
            log_file.flush()
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\r\0").replace(b"\n", b"\n\0").split(b"\0")
            out = b"".join(line for line in lines if keep.keep(line.decode(errors="replace")))
            if out:
                console.write(out)
                console.flush()
        if pending and keep.keep(pending.decode(errors="replace")):
            console.write(pending)
            console.flush()
    stream.close()
