"""The one exception a user can cause; the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (data, config, checkpoint); never a bug in raysslvit."""
