"""User-facing errors.

Anything a user can fix (bad config value, missing data, unknown name) raises `UserError`.
The CLI prints it as one line and exits non-zero, without a traceback. It subclasses
`ValueError` so library users can catch it the usual way.
"""


class UserError(ValueError):
    """An error caused by input the user can fix; the message names the fix."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data source is not installed; the message names the package or variable to set."""
