"""The one exception type users see: a one-line message and exit code 2 from the CLI."""


# Exit code of a rank that stopped because a peer died or hung: an effect, not a cause, so
# the launcher looks past it for the rank that failed first.
EXIT_LOST_PEER = 3


class TpError(Exception):
    """A problem with the user's input (file, flag, prompt) rather than a bug in tpruntime."""

    exit_code = 2

    def __init__(self, message: str, *, local: bool = False):
        super().__init__(message)
        # True when the problem is this rank's own (its GPU, its files); other problems are
        # the same on every rank and only rank 0 reports them.
        self.local = local
