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
import threading
import time
import traceback

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
# Lines Ray's workers send to the driver that alarm a user and ask nothing of them; quiet, they go to
# the log file only. Ray Train's controller logs this error for its own PreemptionWatcher actor at
# every training stage (ray-project/ray#53727).
RAY_NOISE = ("has constructor arguments in the object store and max_restarts > 0",)
_log_file: logging.Handler | None = None
_levels: dict = {}  # loggers and handlers whose level route_library_logs changed, and their level before


class _Tee:
    """A console stream that also writes each complete line, time-stamped, to the log file; tqdm's
    carriage-return redraws stay on the console (its bar's last state reaches the file as a line).
    Ray's log monitor thread writes workers' lines while the main thread writes its own: a lock."""

    def __init__(self, console, file):
        self.console, self.file, self.pending = console, file, ""
        self.lock = threading.Lock()
        self.hiding = False  # a RAY_NOISE line is being written: its newline stays off the console too

    def write(self, text: str) -> int:
        if not verbose() and any(noise in text for noise in RAY_NOISE):
            self.hiding = True
        elif not (self.hiding and text == "\n"):
            self.hiding = False
            self.console.write(text)
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            self._to_file(lines)
        return len(text)

    def _to_file(self, lines: list[str]) -> None:
        if self.file.closed:  # a handler made while the log was open may outlive it
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in lines:
            shown = line.rsplit("\r", 1)[-1]
            if shown.strip():
                self.file.write(f"{stamp} {shown}\n")

    def close_file(self) -> None:
        """The last line, even without its newline (a bar cut short by an exception)."""
        with self.lock:
            self._to_file([self.pending])
            self.pending = ""

    def flush(self) -> None:
        self.console.flush()
        if not self.file.closed:
            self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.console, name)


def _shown_on_console(record: logging.LogRecord) -> bool:
    """Whether a handler on the record's way up writes it to the console through the tee (it then
    reaches the file as a console line, so the file handler skips it)."""
    lg: logging.Logger | None = logging.getLogger(record.name)
    while lg is not None:
        for handler in lg.handlers:
            if isinstance(getattr(handler, "stream", None), _Tee) and record.levelno >= handler.level:
                return True
        lg = lg.parent if lg.propagate else None
    return False


def route_library_logs() -> None:
    """Quiet, send the library loggers' records down to INFO to the open log file while their
    console handlers keep the console's level (verbose, the console shows them: the file has them
    as console lines). Called again after ``ray.init``, which sets Ray's loggers."""
    if _log_file is None or verbose():
        return
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for handler in lg.handlers:
            if handler is not _log_file and handler.level < lg.getEffectiveLevel():
                _levels[handler] = handler.level
                handler.setLevel(lg.getEffectiveLevel())
        if lg.getEffectiveLevel() > logging.INFO:
            _levels[lg] = lg.level
            lg.setLevel(logging.INFO)
        if _log_file not in lg.handlers:
            lg.addHandler(_log_file)


def note_in_log(text: str) -> None:
    """A line for the open log file only (not the console), once per file (a pipeline's stages
    each connect to Ray, and the log needs the cluster's address once)."""
    if _log_file is not None and text not in _log_file.notes:
        _log_file.notes.add(text)
        _log_file.stream.write(f"# {text}\n")


@contextlib.contextmanager
def log_to_file(path: str, header: list[str]):
    """Everything the console shows while the block runs, the log records quiet mode keeps off it
    (other libraries' and Ray's, down to INFO) and the traceback of an exception that ends the
    block, in the file ``path`` (appended to), after the ``header`` lines. Ray's worker processes
    keep their own logs in Ray's session folder."""
    global _log_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as file:
        for line in header:
            file.write(f"# {line}\n")
        _log_file = logging.StreamHandler(file)
        _log_file.setFormatter(logging.Formatter(LOG_FORMAT))
        _log_file.setLevel(logging.INFO)
        _log_file.addFilter(lambda record: not _shown_on_console(record))
        _log_file.notes = set()
        streams = sys.stdout, sys.stderr
        tees = _Tee(sys.stdout, file), _Tee(sys.stderr, file)
        sys.stdout, sys.stderr = tees
        try:
            route_library_logs()
            yield
        except BaseException:
            file.write(traceback.format_exc())
            raise
        finally:
            for tee in tees:
                tee.close_file()
            sys.stdout, sys.stderr = streams
            # Handlers made inside the block (ray.init's) write to the console again, not the file.
            for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
                for handler in getattr(lg, "handlers", []):
                    if isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, _Tee):
                        handler.setStream(handler.stream.console)
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).removeHandler(_log_file)
            for obj, level in _levels.items():
                obj.setLevel(level)
            _levels.clear()
            _log_file = None
