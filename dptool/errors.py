"""Exception types: what the user can fix (InputError) versus everything else (DptoolError)."""

__all__ = ["DptoolError", "InputError"]


class DptoolError(Exception):
    """Base class of dptool's errors; the CLI prints the message in one sentence and exits 1."""


class InputError(DptoolError):
    """A bad file, value or option that the user can fix; the CLI exits 2."""
