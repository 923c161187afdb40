"""Process exit codes and the stop signals of a run."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("dinox.train")

EXIT_OK = 0
EXIT_WONT_FIT = 3
EXIT_NONFINITE = 4
EXIT_ANOMALY = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGHUP = 129
REPEAT_GRACE_S = 2.0   # a repeated stop signal within this is the same request (interrupts_raise)


# Ctrl+C; a scheduler's stop (SLURM, Kubernetes); a closed terminal or ssh session; the
# pre-emption warnings schedulers send ahead of the stop (SLURM's --signal=USR1@T): each asks
# the run to finish its step and save. Those a platform lacks (Windows) are left out.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, name))


def leave_stop_signals_to_parent() -> None:
    """In a worker process: ignore the stop signals, which its parent acts on (Ctrl-C and a
    hangup reach the whole process group, a scheduler may signal every process of the job),
    except SIGTERM, which ends it: that is how a parent stops a worker that does not exit."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.SIG_IGN)


def end_with_parent() -> None:
    """In a worker process (Linux): have the kernel send it SIGTERM when the process that
    forked it dies (prctl PR_SET_PDEATHSIG). A parent killed outright (SIGKILL, the system out
    of memory) cannot stop its workers, and a process pool's workers would wait on their task
    queue for ever. Under the forkserver start method the forker is the server, which exits
    with the main process, so the workers still follow. Elsewhere (no prctl) nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_when_orphaned(poll_s: float = 1.0) -> None:
    """In a rank torchrun started: ask this process to stop (one SIGTERM: finish the step,
    save, exit) once its launcher is gone. A torchrun killed outright, or by a signal it does
    not forward (SIGUSR1 and SIGUSR2 unless named in its --signals-to-handle: SLURM's
    pre-emption warning), left its ranks training on as orphans. Not PR_SET_PDEATHSIG: the
    kernel sends that again as each of the launcher's threads exits, and a second SIGTERM
    stops at once, without the checkpoint."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dinox-follow-launcher", daemon=True).start()


class StopRequest:
    """Turns the STOP_SIGNALS into a flag the loop checks after each step; a second signal
    stops at once, except while a checkpoint is being written (`writing`), which it lets
    finish first: a save cut short leaves a half-written file and the steps since the last
    one lost. It raises the exception of that signal (`stopped_at_once`), whose one line says
    what was kept, and `dinox` exits as for it: 130 Ctrl+C, 129 SIGHUP, 143 the others."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._writing = False
        self._forced: int | None = None   # the second signal, held until the save ends

    def install(self) -> None:
        """Handle the stop signals, except those the process was started ignoring: `nohup`
        ignores SIGHUP, and a shell ignores SIGINT in its background jobs, so that they
        outlive the terminal; a run must not stop on them either."""
        for sig in STOP_SIGNALS:
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def writing(self):
        """Hold a second signal until the checkpoint written inside has been saved."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._forced is not None:
            self.uninstall()
            raise stopped_at_once(self._forced, saved=True)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if self._writing:
                self._forced = signum
                log.warning("%s received again: stopping as soon as the checkpoint being written is saved", name)
                return
            self.uninstall()
            raise stopped_at_once(signum, saved=False)
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving a checkpoint", name)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_OK


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop, `timeout`) as an exception, raised where
    `interrupts_raise` is in force: like Ctrl-C's KeyboardInterrupt it unwinds through every
    `finally`, so work that is done gets recorded, and `dinox` exits 143."""

    signame = "SIGTERM"
    exit_code = EXIT_SIGTERM

    def __str__(self) -> str:   # what `dinox` prints where no command said more
        return super().__str__() or f"stopped by {self.signame}"


class HungUp(Terminated):
    """SIGHUP (the terminal or ssh session closed, without nohup or tmux) as Terminated;
    `dinox` exits 129 (128 + the signal), as the shell reports a process the hangup ended."""

    signame = "SIGHUP"
    exit_code = EXIT_SIGHUP


_RAISED = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated,
           **({signal.SIGHUP: HungUp} if hasattr(signal, "SIGHUP") else {})}


def stopped_at_once(signum: int, *, saved: bool) -> KeyboardInterrupt:
    """A training run's second stop signal as the exception of that signal, with the one line
    `dinox` prints: whether the checkpoint being written was kept, and how to go on."""
    name = signal.Signals(signum).name
    kept = ("right after the checkpoint being written was saved" if saved
            else "without saving: the steps since the last checkpoint are lost")
    return _RAISED.get(signum, Terminated)(f"stopped at once by a second stop signal ({name}), {kept}; "
                                           "continue with --resume auto")


def interrupt_name(exc: BaseException) -> str:
    """The signal behind an interruption: SIGTERM or SIGHUP for Terminated, else SIGINT (Ctrl-C)."""
    return getattr(exc, "signame", "SIGINT")


@contextlib.contextmanager
def interrupts_raise(explain: Callable[[str], str] | None = None):
    """Within: the first SIGINT raises KeyboardInterrupt, the first SIGTERM Terminated and
    the first SIGHUP HungUp in the main thread. Repeats within REPEAT_GRACE_S are ignored, so
    that the cleanup the first one starts (a volume index written, worker processes stopped)
    is not cut short: `timeout` sends its signal twice (to the process and to its group). One
    later than that (a user whose cleanup seems stuck presses Ctrl-C again) ends the process
    at once, with one line, as `StopRequest` does a run's. Without this, SIGTERM ends the
    process at once, without a word and with no `finally` run. Signals the process was
    started ignoring stay ignored (see StopRequest.install). `explain(signal name)`, where
    given, is the one line `dinox` prints for an interruption that says nothing itself: what
    the command leaves and what to do, e.g. "eval probe stopped by SIGTERM; ..."."""
    fired: list[float] = []

    def handle(signum, frame):
        if fired:
            if time.monotonic() - fired[0] < REPEAT_GRACE_S:
                return
            name = signal.Signals(signum).name
            print(f"{name} received again: stopping at once, without finishing the cleanup", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        fired.append(time.monotonic())
        raise _RAISED[signum]

    previous = {}
    for sig in _RAISED:
        try:
            if signal.getsignal(sig) != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handle)
        except (ValueError, OSError):   # not the main thread
            pass
    try:
        yield
    except KeyboardInterrupt as exc:
        if explain is None or exc.args:   # the code inside said what it left
            raise
        raise type(exc)(explain(interrupt_name(exc))) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
