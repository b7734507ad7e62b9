"""A Typer group whose sub-commands are imported when used, so that `--help` stays instant.

Click's documented pattern (click.palletsprojects.com/en/stable/complex/#lazily-loading-subcommands),
with one addition: while the group's help lists its commands, each lazy entry is shown from its
registered one-line help without being imported (click's pattern imports every group to list it).
"""

from __future__ import annotations

import importlib

import typer
from typer import main as typer_main
from typer.core import TyperCommand, TyperGroup
from typer.models import CommandInfo, TyperInfo


class LazyGroup(TyperGroup):
    """Subclass with `lazy = {name: ("module:attribute", one-line help)}`; the attribute is a Typer
    app (a sub-group) or a command function."""

    lazy: dict[str, tuple[str, str]] = {}
    _listing = False  # True while the help lists commands

    def list_commands(self, ctx) -> list[str]:
        """The group's own commands in the order they were made, then the lazy ones not loaded yet."""
        return [*self.commands, *(name for name in self.lazy if name not in self.commands)]

    def get_command(self, ctx, cmd_name: str):
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return self.commands.get(cmd_name)
        if self._listing:
            return TyperCommand(cmd_name, help=self.lazy[cmd_name][1])
        self.commands[cmd_name] = self._load(cmd_name)
        return self.commands[cmd_name]

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def _load(self, name: str):
        """Import the entry and build it as `app.add_typer` / `app.command` would."""
        module, attribute = self.lazy[name][0].split(":")
        target = getattr(importlib.import_module(module), attribute)
        if isinstance(target, typer.Typer):
            return typer_main.get_group_from_info(TyperInfo(target, name=name), pretty_exceptions_short=True,
                                                  rich_markup_mode=self.rich_markup_mode,
                                                  suggest_commands=self.suggest_commands)
        return typer_main.get_command_from_info(CommandInfo(name=name, callback=target), pretty_exceptions_short=True,
                                                rich_markup_mode=self.rich_markup_mode)
