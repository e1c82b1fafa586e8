"""The one error for bad input, wherever it comes from (a flag, a config key, a policy
file, a request field): the message names the field and the accepted values. The CLI
prints it as one line and exits 2; the daemon answers INVALID_ARGUMENT."""


class InputError(ValueError):
    """Bad input; the message names the field and what it accepts."""
