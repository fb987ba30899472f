"""Stopping a run on SIGINT/SIGTERM; light (no torch at import) so the entry scripts arm it first."""
import signal
import time


def _say(text):
    from tqdm.auto import tqdm

    tqdm.write(text)


class StopRequest:
    """SIGINT/SIGTERM: before training starts, exit at once (status 0, nothing to save); once it
    has started (`training = True`), set a flag: the loop saves a checkpoint after the current
    step and exits.

    Made before anything slow (the entry scripts, then train()), since it replaces an inherited
    "ignore": a launcher started in the background (`cmd &`, nohup) or under run_logged.sh's
    `trap '' INT TERM` passes SIGINT and SIGTERM on ignored, so without it a stop during the
    minutes of start-up (imports, models, data scan, compile) would be lost.
    """

    def __init__(self):
        self.requested = False
        self.training = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.training:
            _say(f"signal {name} before training started: stopped, no checkpoint written")
            raise SystemExit(0)
        # The same stop often arrives twice (terminal group + launcher); a later one means "now".
        if self.requested and time.monotonic() - self.requested > 5:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = time.monotonic()
        _say(f"signal {name}: saving a checkpoint after this step, then exiting")

    def agreed(self, accelerator):
        """True on every process if any process was asked to stop (accelerate's trigger: a sum
        over processes); one process reads its own flag, without waiting for the GPU."""
        if accelerator.num_processes == 1:
            return bool(self.requested)
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()
