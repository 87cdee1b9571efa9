"""Console verbosity, shared by the CLI and the Ray layers: quiet unless ``HISTODIFF_VERBOSE=1``
(``histodiff --verbose``). Quiet keeps the project's own progress and summaries and leaves Ray's
progress bars and logs to Ray's session log folder (``/tmp/ray/session_latest/logs``). Each command
also keeps a full log in its output folder (``log_to_file``; the CLI names it): the console's lines
and the records quiet mode keeps off the console."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

VERBOSE_ENV = "HISTODIFF_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a test's capture, a redirected job log)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def logger(name: str) -> logging.Logger:
    """The logger of a histodiff_ray module. Its lines go to stdout as they are (they carry their
    stage, e.g. ``[evaluate] ...``), in the driver and in Ray workers alike, whatever level Ray
    gives the root logger there."""
    root = logging.getLogger("histodiff_ray")
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        root.addHandler(_CurrentStdout())
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers whose records quiet mode keeps off the console but a log file keeps, down to INFO: the
# root (other libraries) and Ray's own, which do not pass their records on to the root.
LIBRARY_LOGGERS = ("", "ray", "ray.data")
_log_file: logging.Handler | None = None
_levels: dict = {}  # loggers and handlers whose level route_library_logs changed, and their old level


class _Tee:
    """A console stream that also writes each complete line, time-stamped, to the log file; tqdm's
    carriage-return redraws stay on the console (its bar's last state reaches the file as a line)."""

    def __init__(self, console, file):
        self.console, self.file, self.pending = console, file, ""

    def write(self, text: str) -> int:
        self.console.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in lines:
            shown = line.rsplit("\r", 1)[-1]
            if shown.strip():
                self.file.write(f"{stamp} {shown}\n")
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.console, name)


def route_library_logs() -> None:
    """Send the library loggers' records down to INFO to the open log file while their console
    handlers keep the console's level. Called again after ``ray.init``, which sets Ray's loggers."""
    if _log_file is None:
        return
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        if name == "" and not lg.handlers:  # what Python prints with no handler at all, kept
            lg.addHandler(logging.lastResort)
        for handler in lg.handlers:
            if handler is not _log_file and handler.level < lg.getEffectiveLevel():
                _levels.setdefault(handler, handler.level)
                handler.setLevel(lg.getEffectiveLevel())
        if lg.getEffectiveLevel() > logging.INFO:
            _levels.setdefault(lg, lg.level)
            lg.setLevel(logging.INFO)
        if _log_file not in lg.handlers:
            lg.addHandler(_log_file)


def note_in_log(text: str) -> None:
    """A line for the open log file only (not the console)."""
    if _log_file is not None:
        _log_file.stream.write(f"# {text}\n")


@contextlib.contextmanager
def log_to_file(path: str, header: list[str]):
    """Everything the console shows while the block runs, and the log records quiet mode keeps off
    it (other libraries' and Ray's, down to INFO), in the file ``path`` (appended to), after the
    ``header`` lines. Ray's worker processes keep their own logs in Ray's session folder."""
    global _log_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as file:
        for line in header:
            file.write(f"# {line}\n")
        _log_file = logging.StreamHandler(file)
        _log_file.setFormatter(logging.Formatter(LOG_FORMAT))
        _log_file.setLevel(logging.INFO)
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, file), _Tee(sys.stderr, file)
        try:
            route_library_logs()
            yield
        finally:
            sys.stdout, sys.stderr = streams
            for name in LIBRARY_LOGGERS:
                for handler in (_log_file, logging.lastResort):
                    logging.getLogger(name).removeHandler(handler)
            for obj, level in _levels.items():
                obj.setLevel(level)
            _levels.clear()
            _log_file = None
