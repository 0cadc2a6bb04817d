"""One exception type for mistakes a user can fix (bad config, bad data, missing model).

`cli.py` catches it and prints the message without a traceback; any other exception is a bug
and keeps its traceback.
"""


class ChatrlError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
