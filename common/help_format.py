"""`--help` that shows every option's default.

    argparse.ArgumentParser(..., formatter_class=HelpFormatter)

The description and epilog keep their line breaks (RawDescriptionHelpFormatter)
and an option with a default (not None, not a store_true's False) gets
"(default: X)" after its help, unless that help already states its default
("(default ...)", "default: ...", "%(default)s"). Unlike argparse's
ArgumentDefaultsHelpFormatter it also covers options without a help text and
writes a list default as it is typed (`1 2`, not `[1, 2]`).
"""
from __future__ import annotations

import argparse
import copy
import re

STATED = re.compile(r"%\(default\)|\(default\b|\bdefault:")


def shown_default(action: argparse.Action) -> str | None:
    """The default as --help writes it, or None when there is none to show."""
    default = action.default
    if (not action.option_strings or action.help == argparse.SUPPRESS
            or default is None or default is False or default == argparse.SUPPRESS):
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def add_argument(self, action: argparse.Action) -> None:
        default = shown_default(action)
        if default is not None and not STATED.search(action.help or ""):
            action = copy.copy(action)   # the parser's own action stays as it was
            note = f"(default: {default.replace('%', '%%')})"
            action.help = f"{action.help} {note}" if action.help else note
        super().add_argument(action)
