"""The errors clipjax reports as one line, without a traceback (see `main.py`)."""

import signal


class ConfigError(ValueError):
    """A bad config value or input; the message names the field and the fix."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. it diverged); the message says where it stopped and what
    is left."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint was saved."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped at step {step} and saved {checkpoint}; run the same "
            "command again to resume."
        )
