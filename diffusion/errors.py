"""The one exception type for mistakes a user can fix, and how entry points report it."""

from __future__ import annotations

import sys
import textwrap


class UserError(ValueError):
    """Bad input from a user: a config, flag, file or argument. The message names the fix.

    Entry points print it as one paragraph and exit non-zero, without a Python traceback.
    """


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite (config.training.nan_policy = "stop")."""


def report_user_error(error: Exception, program: str) -> int:
    """Prints `error` (a UserError, or a flag that does not parse) for a person and returns the
    exit status to use."""
    message = textwrap.fill(str(error), width=100, break_long_words=False, break_on_hyphens=False)
    print(f"{program}: error: {message}", file=sys.stderr)
    return 2


def parse_flags_or_exit(argv, program: str, parse=None):
    """An absl `flags_parser`: a flag that does not parse (or a UserError from `parse`) is a user
    error, reported as one paragraph with exit status 2 instead of absl's status 1."""
    from absl import flags

    try:
        return (parse or flags.FLAGS)(argv)
    except (flags.Error, UserError) as error:
        message = f"{str(error).rstrip('.')}; see python {program} --help."
        sys.exit(report_user_error(UserError(message), program))
