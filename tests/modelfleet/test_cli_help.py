"""Every flag of every `modelfleet` command says what it does and what it defaults to."""

import argparse

from modelfleet.cli import build_parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_has_help_with_its_default() -> None:
    commands = subcommands(build_parser())
    assert {"up", "api", "worker", "flower", "nodes", "ps", "models", "load", "unload", "events"} <= set(commands)
    missing = []
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if not action.help or "default" not in action.help:
                missing.append(f"modelfleet {name} {'/'.join(action.option_strings)}: {action.help!r}")
    assert not missing, "\n".join(missing)
