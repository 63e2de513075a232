"""`--help` without typer's placeholders: `--json`, not `--json <bool>`; `RUN_ID`, not `{RUN_ID} <str>`.

Typer (0.2x) prints a type after every parameter, `<bool>` for a flag that takes no
value, and wraps an argument's name in `{...}` (required) or `[...]` (optional) in
the usage line. Each command here names its arguments with a metavar that already
says what goes there, so the help shows that name alone, in the usual notation:
`RUN_ID` when required, `[RUN_ID]` when not. Options with a value keep their metavar
(`--db PATH`); flags show nothing after their name.

Every command is made with `Command` (and the app with `Group`): they retag the
parameters typer built, as the help is put together.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

__all__ = ["Command", "Group"]


class _Flag(TyperOption):
    """An option that takes no value (`--json`, `--help`): nothing after its name."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _Argument(TyperArgument):
    """A positional argument shown by its metavar: `RUN_ID`, or `[RUN_ID]` when optional."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.metavar or (self.name or "").upper()
        if self.nargs != 1:
            name += "..."
        return [name if self.required else f"[{name}]"]


def _tidy(params: list[Any]) -> list[Any]:
    for param in params:
        if type(param) is TyperOption and param.is_flag:
            param.__class__ = _Flag
        elif type(param) is TyperArgument and param.metavar:
            param.__class__ = _Argument
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy(super().get_params(ctx))
