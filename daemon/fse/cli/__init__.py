"""The command line: argument parsing shared by all commands, rendering, one module per
command. The top layer: it may import every other one.
"""

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `fse` entry point (fse.cli.main.main, imported on call)."""
    from fse.cli.main import main as run

    return run(argv)
