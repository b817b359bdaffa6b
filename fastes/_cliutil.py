"""What the ``fastes`` and ``fastes analyze`` command lines share: one-line errors (exit 2), KEY=VALUE options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A user mistake: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as a dict, each VALUE read as YAML (``3`` is an int, ``true`` a bool);
    a VALUE that is not valid YAML (``template={a}+{b}=``) stays the string it is."""
    import yaml

    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise BadInput(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key] = value
    return options


def run_command(prog: str, command: Callable[[], int]) -> int:
    """``command()``'s exit code; bad input (BadInput, ValueError, FileNotFoundError) is one line
    ``PROG: error: MESSAGE`` on stderr and exit 2, Ctrl-C exit 130."""
    try:
        return command()
    except (BadInput, ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def resolve_model_path(data: dict[str, Any], config_file: Path) -> None:
    """A relative model path that is not found from the working directory is read relative to the config file."""
    model = data.get("model")
    if isinstance(model, str) and model and not Path(model).is_absolute() and not Path(model).exists():
        for base in (config_file.parent, config_file.parent.parent):
            if (base / model).exists():
                data["model"] = str(base / model)
                return
