"""The one exception type a user sees: its message is the whole error line."""

# Every character str.splitlines() breaks on, written as its escape so user text (an override, a key) cannot split the line.
_LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode() for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class LegendError(Exception):
    """A problem the user can fix (config, data, model name, checkpoint).

    The CLI prints ``error: <message>`` and exits with code 2; the message names the problem and the fix, on one line.
    """

    def __init__(self, message: str):
        super().__init__(message.translate(_LINE_BREAKS))
