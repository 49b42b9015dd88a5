"""The exception that carries a user mistake to the command line as one line."""


class UsageError(Exception):
    """Bad input or an unusable environment, reported as one line and a non-zero exit."""
