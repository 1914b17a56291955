"""SIGINT and SIGTERM stop the pipeline as `Interrupted`; its runs are then ended as KILLED."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("autolr")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the pipeline; its runs were ended as KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _SignalStop:
    """The handler of SIGINT (Ctrl-C) and SIGTERM (`docker stop`, Kubernetes, `ray job stop`).

    It raises `Interrupted` until the pipeline takes it up (`take`), which then
    ends the runs as KILLED; signals after that are ignored, so the cleanup runs
    to its end. Python drops an exception raised in a ``__del__`` or a weakref
    callback (seen in sqlalchemy's), so until it is taken the signal is sent again.
    """

    RESEND_S = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self.taken = self.active = False
        self._lock = threading.Lock()  # no resend once taken or uninstalled
        self._session = 0  # which `installed` block a resend belongs to

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signum, self.taken, self.active = None, False, True
        self._session += 1
        saved = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        unraisable = sys.unraisablehook

        def quiet(dropped) -> None:  # a dropped Interrupted is sent again: no traceback for it
            if not isinstance(dropped.exc_value, Interrupted):
                unraisable(dropped)

        sys.unraisablehook = quiet
        try:
            yield
        finally:
            with self._lock:
                self.active = False
            sys.unraisablehook = unraisable
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def take(self) -> None:
        with self._lock:
            self.taken = True

    def __call__(self, signum: int, _frame) -> None:
        if self.taken or not self.active:  # taken, or main is returning: let it finish
            log.info("%s: already stopping", signal.Signals(signum).name)
            return
        if self.signum is None:
            self.signum = signum
            resend = threading.Thread(target=self._resend, args=(signum, self._session))
            resend.daemon = True
            resend.start()
        raise Interrupted(self.signum)

    def _resend(self, signum: int, session: int) -> None:
        # A resend still asleep when its run ended must not reach the next run in
        # this process (a notebook, a test): it checks that its session is current.
        while True:
            time.sleep(self.RESEND_S)
            with self._lock:
                if self.taken or not self.active or self._session != session:
                    return
                os.kill(os.getpid(), signum)


_signals = _SignalStop()
