"""The one exception type users see: a single line naming the problem and the fix."""


class FluxExportError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
