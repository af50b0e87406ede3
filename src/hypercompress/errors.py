"""One exception type for bad user input.

Every message is one line that names the problem and the fix; the CLI prints it and exits with code 2.
"""


class UserError(Exception):
    """Bad input from the user (path, recipe key, artifact, data): printed as one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
