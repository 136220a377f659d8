"""Project exceptions and the exit codes the CLI maps them to.

Every error a user can cause is raised as a :class:`NucliError` subclass with a
one-line message that says what is wrong and, where possible, how to fix it.
The CLI prints the message and exits with ``exit_code`` -- never a traceback
(``--debug`` shows one).

Exit codes (documented in the README):

* 0 -- success
* 1 -- usage error (bad option values, conflicting options)
* 2 -- input error (missing/unreadable/corrupt input, output exists, ...)
* 3 -- runtime failure (a step failed while processing valid input)
* 4 -- feature not available in this version
* 130 -- interrupted (Ctrl-C); the run store is left resumable
"""

from __future__ import annotations


class NucliError(Exception):
    """Base class: a problem the user can act on. Message is one line."""

    exit_code = 2


class UsageError(NucliError):
    """Options are invalid or conflict with each other."""

    exit_code = 1


class InputError(NucliError):
    """An input file/directory is missing, unreadable, corrupt or unsuitable."""

    exit_code = 2


class OutputExistsError(InputError):
    """An output already exists and ``--overwrite`` was not given."""


class WeightsError(InputError):
    """A weights file is missing, corrupt, or belongs to another method/shape."""


class StoreError(InputError):
    """A run store is incompatible, locked, damaged or from a newer version."""


class ProcessingError(NucliError):
    """Processing valid input failed (e.g. a nucleus larger than the overlap)."""

    exit_code = 3


class NotAvailableError(NucliError):
    """The requested feature is not built in this version."""

    exit_code = 4
