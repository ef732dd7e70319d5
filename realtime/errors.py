"""User-facing errors: one line that says what went wrong, where, and how to fix it."""


class UserError(Exception):
    """A mistake in the user's input (path, flag, device, asset), not a bug.

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``; no traceback.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(" ".join(message.split()))  # always one line
        self.exit_code = exit_code


class AssetError(UserError):
    """A model asset (FLAME, MICA, checkpoint, engine) is missing or incompatible."""


class MediaError(UserError):
    """An input or output medium (file, camera, stream) cannot be opened or decoded."""
