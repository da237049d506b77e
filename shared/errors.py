"""The one exception type that reaches users as a message instead of a traceback."""


class FedclifError(Exception):
    """A problem the user can fix: bad input, bad config, missing file.

    The CLI prints the message and exits non-zero; anything else is a bug.
    """
