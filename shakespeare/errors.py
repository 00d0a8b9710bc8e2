"""The one exception type users see: a problem with their input, explained in one paragraph."""


class UsageError(Exception):
    """A bad config value, file, prompt or checkpoint. The message names the value and the fix."""


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM; the message says what was saved and how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
