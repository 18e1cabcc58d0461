"""The one exception type for user mistakes.

A `DualEncError` carries a single line that names the offending file, field or value and says
what to do. Command-line `main()` functions catch only this type, print `error: <message>` and
exit with status 2; any other exception is a bug and keeps its traceback.
"""


class DualEncError(Exception):
    """A user mistake (bad path, bad value, bad file) described in one actionable line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), to quote a library
    failure inside a one-line `DualEncError`."""
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__
