"""The one exception a user can cause, and how both CLIs report it and a bad flag: one line, exit 2."""
import argparse
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (data, config, checkpoint); never a bug in raysslvit."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_cli(prog: str, body: Callable[[], object]) -> int:
    """A CLI's exit code: 0, or 2 with the user error's one line on stderr."""
    try:
        body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
