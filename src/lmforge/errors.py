"""User-facing errors: the CLI prints them as one line and exits non-zero (no traceback)."""


class LmforgeError(Exception):
    """A problem with the user's input, config or files. The message names the file (and line) or key."""


class ConfigError(LmforgeError):
    """A bad config value, raised by a config's `validate()` with the key relative to that config.

    The config loader prefixes the key with the section it was building, so the user reads the full path
    (`ppo.actor_optim.lr`, not `lr`) whether the config came from `lmforge ppo` or from `lmforge run`.
    """

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"config key '{key}' {problem}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with `prefix` (e.g. 'ppo.') in front of its key."""
        return ConfigError(prefix + self.key, self.problem)


def where(path, line: int | None = None) -> str:
    """'file' or 'file:line' for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
