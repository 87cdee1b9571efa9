"""Console verbosity, shared by the CLI and the Ray layers: quiet unless ``HISTODIFF_VERBOSE=1``
(``histodiff --verbose``). Quiet keeps the project's own progress and summaries and leaves Ray's
progress bars and logs to Ray's session log folder (``/tmp/ray/session_latest/logs``)."""

from __future__ import annotations

import logging
import os
import sys

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
