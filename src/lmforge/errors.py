"""User-facing errors: the CLI prints them as one line and exits non-zero (no traceback)."""


class LmforgeError(Exception):
    """A problem with the user's input, config or files. The message names the file (and line) or key."""


def where(path, line: int | None = None) -> str:
    """'file' or 'file:line' for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
