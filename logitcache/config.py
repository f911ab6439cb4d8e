"""Stage configs as dataclasses: one per stage, validated in ``__post_init__``, exposed as CLI flags.

Each config field carries its help text in ``field(metadata={"help": ...})``; ``click_options`` turns the fields
into click options (``top_k`` -> ``--top-k``), so the dataclass is the single place where a flag, its default
and its documentation live. ``--config FILE`` (JSON, TOML or YAML) supplies any field; flags given on the command
line win over the file. ``ConfigError`` messages name the flag (``--top-k``), which is what the user typed.

The resolved config (``to_dict``) is written next to every output so a run can be reproduced and a resume can be
checked against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is invalid; the message names the flag."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with CLI help text."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None`` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def click_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding one click option per dataclass field, plus ``--config FILE``.

    Options default to ``None`` on the command line so that ``from_sources`` can tell "not given" (use the
    config file or the dataclass default) from an explicit value.
    """
    hints = typing.get_type_hints(cls)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(cls)):
            tp, _ = _base_type(hints[f.name])
            meta = f.metadata
            if meta.get("argument"):
                fn = click.argument(f.name, type=str, required=False)(fn)
                continue
            help_text = meta.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            if default not in (None, [], {}) and not isinstance(default, bool):
                help_text += f"  [default: {default}]"
            if meta.get("required"):
                help_text += "  [required]"
            if tp is bool:
                fn = click.option(
                    f"{flag(f.name)}/--no-{f.name.replace('_', '-')}",
                    f.name,
                    default=None,
                    help=help_text + (f"  [default: {'on' if default else 'off'}]"),
                )(fn)
            elif typing.get_origin(tp) is list:
                item = typing.get_args(tp)[0]
                fn = click.option(
                    flag(f.name), f.name, type=item, multiple=True, default=None, help=help_text + "  (repeatable)"
                )(fn)
            elif "choices" in meta:
                fn = click.option(
                    flag(f.name), f.name, type=click.Choice(meta["choices"]), default=None, help=help_text
                )(fn)
            else:
                fn = click.option(
                    flag(f.name), f.name, type=tp if tp in (int, float, str) else str, default=None, help=help_text
                )(fn)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="Read any of these options from a JSON, TOML or YAML file; flags override it.",
        )(fn)

    return decorate


def _parse_problem(e: Exception) -> str:
    """One line for a JSON, TOML or YAML parse error: where (line, column; 1-based) and what."""
    mark = getattr(e, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        where = f" at line {cmark.line + 1}, column {cmark.column + 1}" if cmark is not None else ""
        what = f"{problem} ({' '.join(context.split())}{where})" if context else problem
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    if isinstance(e, json.JSONDecodeError):
        return f"line {e.lineno}, column {e.colno}: {e.msg}"
    return " ".join(f"{type(e).__name__}: {e}".split())  # tomllib's message names line and column itself


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            data = tomllib.loads(raw.decode())
        elif path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except Exception as e:
        raise ConfigError(f"--config {path}: cannot parse: {_parse_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def from_sources(cls: type[T], cli_values: dict[str, Any], config_file: str | None = None) -> T:
    """Build ``cls`` from the config file (if any) overridden by the flags that were given."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if config_file:
        loaded = load_config_file(config_file)
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ConfigError(f"--config {config_file}: unknown option(s) {', '.join(flag(u) for u in unknown)}")
        values.update(loaded)
    for key, value in cli_values.items():
        if key in names and value is not None and value != ():
            values[key] = list(value) if isinstance(value, tuple) else value
    missing = [f for f in dataclasses.fields(cls) if f.metadata.get("required") and f.name not in values]  # type: ignore[arg-type]
    if missing:
        names = [f.name.upper() if f.metadata.get("argument") else flag(f.name) for f in missing]
        raise ConfigError(f"missing required option(s): {', '.join(names)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check(condition: bool, name: str, message: str) -> None:
    """Raise ``ConfigError`` naming ``--name`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{flag(name)}: {message}")
