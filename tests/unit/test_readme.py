"""The README's commands are the CLI's: every `keyyo-stream` command it shows (the *Commands*
table, inline mentions, example sessions) names a real command and only options that command
accepts, and each complete example line parses as the CLI would parse it."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from deploy.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
PARSER = build_parser()
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:  # private: argparse has no public listing of subcommands
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]  # type: ignore[no-any-return]
    return None


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _command_parser(words: list[str]) -> argparse.ArgumentParser:
    command = _sub(PARSER, words[0])
    assert command is not None, f"no command {words[0]!r}"
    if words[0] == "process":  # `process NAME`: the common options are every processor's
        name = words[1] if len(words) > 1 and not words[1].startswith("-") else "call-records"
        processor = _sub(command, name if name != "NAME" else "call-records")
        assert processor is not None, f"no processor {name!r}"
        return processor
    return command


def _commands_table() -> list[str]:
    section = README.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z][^`]*)` \|", section, re.M)


def _inline() -> list[str]:
    return re.findall(r"`(?:\.venv/bin/)?keyyo-stream ([a-z][^`]*)`", README)


def _examples() -> list[str]:
    """Example command lines inside code blocks (continuation lines joined)."""
    out, in_block, pending = [], False, ""
    for line in README.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if pending:
            pending += " " + line.strip()
        elif m := re.match(r"^\s*(?:\$ )?(?:\.venv/bin/)?keyyo-stream (.*)$", line):
            pending = m.group(1)
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append(pending.split(" | ")[0].strip())
        pending = ""
    return out


def test_the_readme_shows_commands_in_every_form() -> None:
    assert len(_commands_table()) >= 15
    assert len(_inline()) >= 15
    assert len(_examples()) >= 8


@pytest.mark.parametrize("command", [*_commands_table(), *_inline(), *_examples()])
def test_each_command_the_readme_shows_takes_the_options_it_names(command: str) -> None:
    words = command.replace("\\|", "|").split()
    parser = _command_parser(words)
    unknown = set(FLAG.findall(command)) - _options(parser) - _options(PARSER)
    assert not unknown, f"`{command}`: not options of this command: {sorted(unknown)}"


@pytest.mark.parametrize("command", _examples())
def test_each_example_line_parses(command: str) -> None:
    args = shlex.split(re.sub(r"\$\([^)]*\)", "VALUE", command))  # a shell substitution: one value
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            PARSER.parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"`keyyo-stream {command}` does not parse: {err.getvalue()}") from exc
