"""User-facing errors: one line saying what is wrong and what is allowed; the CLI prints them without a trace."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, hardware). The message is shown to the user as is."""


class DataError(UserError):
    """Missing, partial or corrupt dataset files."""


class CheckpointError(UserError):
    """A truncated, foreign or incompatible checkpoint."""
