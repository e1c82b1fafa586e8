"""The errors every layer speaks, in a leaf module (importing it loads no native code).

InputError is the one error for bad input, wherever it comes from (a flag, a config key,
a policy file, a request field): the message names the field and the accepted values.
The CLI prints it as one line and exits 2; the daemon answers INVALID_ARGUMENT.
EngineError is llama.cpp failing: the CLI exits 1, the daemon ends the stream `error`.
"""


class InputError(ValueError):
    """Bad input; the message names the field and what it accepts."""


class EngineError(RuntimeError):
    """llama.cpp refused an operation; the message says which and why."""
