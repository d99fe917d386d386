"""The one exception a user can cause, and how both CLIs report it and a bad flag: one line, exit 2."""
import argparse
import errno
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (data, config, checkpoint); never a bug in raysslvit."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


# what the machine refuses, not a bug: a full disk, a read-only or forbidden folder
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def disk_error(e: BaseException) -> UserError | None:
    """The one line for an OSError of DISK_ERRORS anywhere in `e`'s chain of causes, else None."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            where = f" writing {e.filename}" if e.filename else ""
            fix = "free space or pass another --out" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "pass another --out"
            return UserError(f"{DISK_ERRORS[e.errno]}{where}: nothing partial was kept; {fix}, then run again "
                             f"(finished stages are reused)")
        e = e.__cause__ or e.__context__
    return None


def run_cli(prog: str, body: Callable[[], object]) -> int:
    """A CLI's exit code: 0, or 2 with the user error's one line on stderr."""
    try:
        body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if (known := disk_error(e)) is None:
            raise
        print(f"{prog}: error: {known}", file=sys.stderr)
        return 2
    return 0
