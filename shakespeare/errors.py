"""The one exception type users see: a problem with their input, explained in one paragraph."""


class UsageError(Exception):
    """A bad config value, file, prompt or checkpoint. The message names the value and the fix."""
