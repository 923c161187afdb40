"""Process exit codes and the SIGINT/SIGTERM handling of a run."""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("dinox.train")

EXIT_OK = 0
EXIT_WONT_FIT = 3
EXIT_NONFINITE = 4
EXIT_ANOMALY = 5
EXIT_SIGINT = 130


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step; a second signal
    gets the default behaviour (immediate stop)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.uninstall()
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving a checkpoint", name)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_OK
