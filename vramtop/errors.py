"""Errors that end a command with one clear line and no traceback."""


class UserError(Exception):
    """Bad input from the user or the outside world (endpoint, file, config)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
