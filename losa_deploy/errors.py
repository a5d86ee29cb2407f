"""One exception type for mistakes a user can fix; the CLI turns it into a one-line message."""


class UserError(Exception):
    """An input problem with a message that says what to do. Exit code 2 by default."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
