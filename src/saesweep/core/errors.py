"""The one exception type for mistakes a person makes (bad config, missing or corrupt files).

The command line prints such an error as a single line naming the key or path, never a traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the config key or the file involved."""


class Interrupted(Exception):
    """A job stopped on SIGTERM (time limit, preemption) after writing a checkpoint."""
