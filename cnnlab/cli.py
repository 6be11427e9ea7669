"""Command-line parsing shared by the subcommands (`cnnlab evaluate|predict|report|models`).

Decision: every subcommand parses with argparse, the standard library's parser, so -h/--help,
usage and choice checking come from it instead of hand-written code, and `Parser` makes every
subcommand report bad input the same way: one line `cnnlab <sub>: message`, exit status 2.
evaluate and predict keep `key=value` arguments, the form of the training command line they
read runs of, as argparse positionals (`KeyValues`); their values stay raw text, not Hydra's
grammar, because sweep run directories are named like `3_loss=mse,optimizer.lr=0.1`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from cnnlab.checks import ConfigError

PREFIX_KEY = ".<key>"  # a key `dataset.<key>` stands for any key under `dataset.`


class Parser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors: the command prints them as `prog: message` (see `fail`)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def fail(prog: str, err: Exception | str) -> int:
    """Bad input, reported the one way: one paragraph on stderr, no traceback; the exit status."""
    print(f"{prog}: {err}", file=sys.stderr)
    return 2


class KeyValues(argparse.Action):
    """`key=value` positionals -> {key: [raw values, in order]}; keys from a {key: help} mapping.

    Keys named `<prefix>.<key>` accept anything under the prefix (the config schema checks them later).
    """

    def __init__(self, option_strings: list[str], dest: str, keys: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.keys = dict(keys)
        self.prefixes = tuple(k[: -len(PREFIX_KEY)] + "." for k in keys if k.endswith(PREFIX_KEY))
        plain = [k for k in keys if not k.endswith(PREFIX_KEY)]
        self.valid = ", ".join(plain + [k for k in keys if k.endswith(PREFIX_KEY)])

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parsed: dict[str, list[str]] = {}
        for arg in values or []:
            key, sep, value = arg.partition("=")
            if not sep or not key:
                parser.error(f"argument {arg!r} is not key=value; valid arguments: {self.valid}")
            named = key in self.keys and not key.endswith(PREFIX_KEY)
            if not named and not any(key.startswith(p) and len(key) > len(p) for p in self.prefixes):
                parser.error(f"unknown argument {key!r}; valid arguments: {self.valid}")
            parsed.setdefault(key, []).append(value)
        setattr(namespace, self.dest, parsed)

    def _get_subactions(self) -> list[argparse.Action]:
        # argparse's help formatter lists an action's subactions under it, one line each (as for subcommands)
        return [argparse.Action([], key, metavar=key, help=text.replace("%", "%%")) for key, text in self.keys.items()]


def key_value_parser(prog: str, synopsis: str, summary: str, keys: Mapping[str, str]) -> Parser:
    """A parser of `key=value` arguments into `args` (see KeyValues); usage: `prog synopsis`."""
    parser = Parser(prog=prog, usage=f"{prog} {synopsis}", description=summary,
                    formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=32))
    group = parser.add_argument_group("arguments (key=value, in any order)")
    group.add_argument("args", nargs="*", default=[], action=KeyValues, keys=keys, metavar="key=value",
                       help="a key given twice: its last value wins, unless its line says otherwise")
    return parser


def last(args: Mapping[str, list[str]], key: str, default: str | None = None) -> str | None:
    """The value of a key given once (a repeated key: the last one wins, as in Hydra)."""
    return args[key][-1] if key in args else default
