"""User-facing errors: raised where bad input enters, printed as one line by the CLI and the app."""


class UserError(ValueError):
    """A problem with what the user asked for; the message names the bad value and what is accepted."""
