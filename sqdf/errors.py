"""Errors a user can fix: the CLI prints their message on one line and exits with status 2."""


class SqdfError(Exception):
    """A problem with the user's input (config, run folder, arguments), not a bug."""


class ConfigError(SqdfError, ValueError):
    """An invalid configuration value or key."""


class DivergedError(SqdfError):
    """Training stopped on non-finite values (``max_skips`` updates in a row skipped): in
    ``sqdf compare`` and ``sqdf bbo`` a result of the method, not a problem with the input."""
