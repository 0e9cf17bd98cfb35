"""The one exception type a user sees: its message is the whole error line."""


class LegendError(Exception):
    """A problem the user can fix (config, data, model name, checkpoint).

    The CLI prints ``error: <message>`` and exits with code 2; the message names the problem and the fix.
    """
