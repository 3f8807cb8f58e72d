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


def test_every_command_says_what_it_does_in_its_own_help() -> None:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {action.dest: action.help for action in sub._choices_actions}  # `modelfleet --help`'s lines
    for name, parser in sub.choices.items():
        assert parser.description and parser.description == listed[name], name
        # Its own --help opens with it (argparse wraps lines there: compare words).
        assert parser.description.split() == parser.format_help().split("\n\n")[1].split(), name
