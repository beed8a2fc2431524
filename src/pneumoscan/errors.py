"""One base class for every error a user can cause, so the CLI prints one line instead of a traceback."""


class PneumoscanError(ValueError):
    """A problem with the user's input; ``str(error)`` is one line that names what and where."""
