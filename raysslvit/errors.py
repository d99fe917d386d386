"""The one exception a user can cause (the CLIs print its message on one line and exit 2), and the
argument parser that reports a bad flag the same way."""
import argparse


class UserError(Exception):
    """Bad input from the user (data, config, checkpoint); never a bug in raysslvit."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")
