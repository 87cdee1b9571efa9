"""Console verbosity, shared by the CLI and the Ray layers: quiet unless ``HISTODIFF_VERBOSE=1``
(``histodiff --verbose``). Quiet keeps the project's own progress and summaries and leaves Ray's
progress bars and logs to Ray's session log folder (``/tmp/ray/session_latest/logs``)."""

from __future__ import annotations

import os

VERBOSE_ENV = "HISTODIFF_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")
