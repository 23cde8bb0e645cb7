"""Exceptions whose message is meant for the user.

The CLI prints ``MmdxError`` messages as one ``Error:`` line and exits 1,
without a traceback. Every message names the file, patient ID or option at
fault and says what to do next.
"""


class MmdxError(Exception):
    """A failure caused by input, options or environment, with a user-facing message."""


class InputError(MmdxError):
    """Invalid input data: a source file, a row, a patient ID or a label."""


class StoreError(MmdxError):
    """A feature store that cannot be opened, read or written as requested."""


class StoreLockedError(StoreError):
    """Another process holds the writer lock of a store."""
