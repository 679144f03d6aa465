"""The two kinds of failure a user sees: bad usage (exit 2) and a failed run (exit 1).

Library code raises these with one sentence naming the file, layer or flag at fault; the CLI
prints that sentence and exits with the code, so no traceback reaches the user.
"""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): the part of a
    library's error worth putting in a one-sentence message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class QcliError(Exception):
    """A run failed for a reason the user can act on (corrupt file, unsupported layer...)."""

    exit_code = 1


class UsageError(QcliError):
    """The command line itself is wrong (bad flag value, conflicting options)."""

    exit_code = 2
