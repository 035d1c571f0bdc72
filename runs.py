"""Stopping a run on a signal: Ctrl-C / SIGTERM finish the step and save; a second Ctrl-C quits at once."""
import signal
import threading

from tqdm.auto import tqdm


class Interrupted(Exception):
    """A stop request arrived during a sample grid or an FID: that work is abandoned, the checkpoint is not."""


class StopOnSignal:
    """First Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.signum, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write("stopping to save a checkpoint (Ctrl-C again to quit at once)")

    def guard(self, fwd):
        """fwd that raises Interrupted once a stop was requested: grids and FID stop within one model call."""
        def guarded(*a, **kw):
            if self.signum is not None:
                raise Interrupted
            return fwd(*a, **kw)
        return guarded

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
