"""The engine's errors for problems a user can fix: a missing GPU, a corrupt file, a run
that diverged. Each message says what was wrong and what to do, so the command lines
(``python -m cnn.train``, the pipeline stages) print it alone, without a traceback."""


class UserError(Exception):
    """A problem with the input, the settings or the machine, not with the engine."""


class ConfigError(UserError, ValueError):
    """Training settings that cannot work (a ValueError too, as bad arguments are)."""
