"""The one exception type users see: a one-line message and exit code 2 from the CLI."""


class TpError(Exception):
    """A problem with the user's input (file, flag, prompt) rather than a bug in tpruntime."""

    exit_code = 2
