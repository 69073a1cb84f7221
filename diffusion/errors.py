"""The exception types for mistakes a user can fix, and the one error boundary of every entry point.

`error_boundary` (or `run_entry_point`) wraps the body of train.py, sample.py, evaluate.py and
encode.py, so every program reports the same failures the same way:

  UserError              one paragraph ("train.py: error: ..."), exit status 2
  OSError (disk full, permissions, read-only file system, a file where a directory is needed,
  a missing file), and the TensorStore/Orbax errors that carry one
                         one paragraph naming the path, the cause in words and the fix, exit 1
  NonFiniteError         "train.py: stopped: ...", exit 1
  anything else          its traceback, as Python prints it (a bug to report, not to hide)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterator


class UserError(ValueError):
    """Bad input from a user: a config, flag, file or argument. The message names the fix.

    Entry points print it as one paragraph and exit non-zero, without a Python traceback.
    """


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite (config.training.nan_policy = "stop")."""


USER_ERROR_EXIT_STATUS = 2
ENVIRONMENT_ERROR_EXIT_STATUS = 1  # disk, permissions, missing files: not the command's fault
STOPPED_EXIT_STATUS = 1


def _print_paragraph(program: str, kind: str, message: str) -> None:
    message = textwrap.fill(message, width=100, break_long_words=False, break_on_hyphens=False)
    print(f"{program}: {kind}: {message}", file=sys.stderr, flush=True)


def report_user_error(error: Exception, program: str) -> int:
    """Prints `error` (a UserError, or a flag that does not parse) for a person and returns the
    exit status to use."""
    _print_paragraph(program, "error", str(error))
    return USER_ERROR_EXIT_STATUS


# absl prints the usage for these and exits with status 1; asking for help is no failure.
HELP_FLAGS = ("-?", "-h", "--h", "-help", "--help", "--helpfull", "--helpshort", "--helpxml")


def parse_flags_or_exit(argv, program: str, parse=None):
    """An absl `flags_parser`: a flag that does not parse (or a UserError from `parse`) is a user
    error, reported as one paragraph with exit status 2 instead of absl's status 1; --help (and
    its kin) print the usage and exit 0."""
    from absl import flags

    try:
        return (parse or flags.FLAGS)(argv)
    except (flags.Error, UserError) as error:
        message = f"{str(error).rstrip('.')}; see python {program} --help."
        sys.exit(report_user_error(UserError(message), program))
    except SystemExit as exit:
        asked_for_help = any(arg.split("=")[0] in HELP_FLAGS for arg in argv[1:])
        if asked_for_help and exit.code == 1:
            sys.exit(0)
        raise


# ------------------------------------------------------------------------------------------------
# Operating-system errors, in words
# ------------------------------------------------------------------------------------------------

# errno -> (the cause in words, the fix). Where a code is missing, the system's own strerror.
_OS_ERROR_WORDS = {
    errno.ENOSPC: ("the disk is full", "free space on that disk, or point the run at another one"),
    errno.EDQUOT: (
        "the disk quota is exceeded",
        "free space within the quota, or point the run at another disk",
    ),
    errno.EACCES: (
        "permission denied",
        "make it writable (or readable) for this user, or choose another path",
    ),
    errno.EPERM: (
        "the operation is not permitted",
        "make it writable (or readable) for this user, or choose another path",
    ),
    errno.EROFS: ("the file system is read-only", "choose a path on a writable file system"),
    errno.ENOTDIR: (
        "part of the path is a file where a directory is needed",
        "move that file away or choose another path",
    ),
    errno.EEXIST: (
        "a file is already there, where a directory is needed",
        "move that file away or choose another path",
    ),
    errno.EISDIR: (
        "it is a directory where a file is needed",
        "move that directory away or choose another path",
    ),
    errno.ENOENT: ("it does not exist", "check the path (the flag or config value that names it)"),
    errno.EIO: (
        "the disk reported an input/output error",
        "check the disk (or the network file system)",
    ),
}

_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)
# TensorStore (under Orbax) raises ValueError('RESOURCE_EXHAUSTED: Error writing local file
# "/run/checkpoints/2.orbax-checkpoint-tmp-.../d/..": ... [os_error_code=\'28\']'): no OSError.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]")
_QUOTED_PATH = re.compile(r'(?:file|directory):? "([^"]+)"')
# Recognised by their words alone (no code in the message): the failures of writing.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
_STRERROR_CODES = {os.strerror(code): code for code in _WRITE_ERRNOS}


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError that `error` is or carries (TensorStore's and Orbax's ValueErrors name the
    OS error only in their message), with its errno and path where known; None otherwise.

    A UserError is never one: its message is already written for a person. Neither are the
    OSErrors of sockets and timeouts (no path, no file errno): they keep their traceback.
    """
    if isinstance(error, OSError):  # a file's, not a socket's or a timeout's
        file_error = isinstance(error, _FILE_ERRORS) or error.filename is not None
        return error if file_error or error.errno in _OS_ERROR_WORDS else None
    if isinstance(error, UserError) or not isinstance(error, ValueError | RuntimeError):
        return None
    text = str(error)
    code = None
    for pattern in (_OS_ERROR_CODE, _ERRNO_IN_TEXT):
        match = pattern.search(text)
        if match:
            code = int(match.group(1))
            break
    if code is None:
        code = next((c for words, c in _STRERROR_CODES.items() if words in text), None)
    if code not in _OS_ERROR_WORDS:  # e.g. a socket's [Errno 104] inside a worker's error
        return None
    path = _QUOTED_PATH.search(text)
    return OSError(code, os.strerror(code), path.group(1) if path else None)


def describe_os_error(error: OSError) -> tuple[str, str]:
    """(the cause in words, e.g. "the disk is full (No space left on device, errno 28)", the fix
    as a sentence without its full stop, e.g. "Free space on that disk, or ...")."""
    cause, fix = _OS_ERROR_WORDS.get(
        error.errno, ((error.strerror or str(error)).rstrip(".").lower(), "fix the cause")
    )
    fix = fix[0].upper() + fix[1:]
    if error.strerror and error.errno in _OS_ERROR_WORDS:
        cause = f"{cause} ({error.strerror}, errno {error.errno})"
    return cause, fix


def os_error_message(error: OSError) -> str:
    """One paragraph for a person: the path, the cause in words and the fix."""
    if error.errno is None:  # raised with a message of its own: FileNotFoundError(f"no ... at ...")
        return str(error)
    cause, fix = describe_os_error(error)
    if error.filename is None:
        where = "a file operation failed"
    elif error.filename2 is not None:
        where = f"cannot move {error.filename} to {error.filename2}"
    else:
        where = f"cannot use {error.filename}"
    return f"{where}: {cause}. {fix}, then rerun the same command."


# ------------------------------------------------------------------------------------------------
# The boundary
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def error_boundary(program: str) -> Iterator[None]:
    """Turns the failures a person can act on into one paragraph and an exit status (see the
    module docstring); any other exception passes through with its traceback.

    with error_boundary("train.py"):
        ...  # the whole body of main()
    """
    try:
        yield
    except UserError as error:
        sys.exit(report_user_error(error, program))
    except NonFiniteError as error:  # a training fault, reported without a traceback
        print(f"{program}: stopped: {error}", file=sys.stderr, flush=True)
        sys.exit(STOPPED_EXIT_STATUS)
    except (OSError, ValueError, RuntimeError) as error:
        os_error = os_error_of(error)
        if os_error is None:
            raise
        _print_paragraph(program, "error", os_error_message(os_error))
        sys.exit(ENVIRONMENT_ERROR_EXIT_STATUS)


def run_entry_point(program: str, main: Callable[[], None]) -> None:
    """Calls `main()` inside :func:`error_boundary`."""
    with error_boundary(program):
        main()
