"""The project's error types: bad input from the user, and a file that could not be written."""


class InputError(ValueError):
    """Bad user input (a file, a field, a flag). Its message is one line that names the
    file and the field; the command-line entry points print it and exit with status 2."""


class WriteError(InputError):
    """A file could not be written (disk full, read-only folder, quota): one line naming the
    file, `reason` being the operating system's words."""

    def __init__(self, path, reason: str, kept: bool):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: cannot write ({reason})" + ("; the previous version is kept" if kept else ""))


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (the class name when it has no message)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
