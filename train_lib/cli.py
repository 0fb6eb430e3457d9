"""A command line generated from a frozen dataclass: one flag per field.

The flag of field ``batch_size`` is ``--batch-size``. Its help is the comment
block right above the field in the class's source, and its type, choices and
checks come from the annotation:

  int, float, str           the value's type
  Literal["a", "b"]         the choices
  Annotated[T, check]       ``check(value)`` returns None, or what is wrong
  tuple[T, ...]             comma-separated values, each a T
  T | None                  None is the default: decided after parsing
  bool                      ``--name`` (default False) or ``--no-name`` (default True)

So the config is declared once, and a bad value is an argparse error that
names the flag and the value (``argument --steps: must be >= 1, got 0``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any, Literal, TypeVar

T = TypeVar("T")
Check = Callable[[Any], "str | None"]


def at_least(low: float) -> Check:
  return lambda v: None if v >= low else f"must be >= {low:g}"


def above(low: float) -> Check:
  return lambda v: None if v > low else f"must be > {low:g}"


def finite(v: float) -> str | None:
  return None if math.isfinite(v) else "must be finite"


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Check:
  """low <= v <= high, with either end open; NaN fails every comparison."""
  def check(v):
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return None if ok else (
        f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    )
  return check


PositiveInt = Annotated[int, at_least(1)]
NonNegativeInt = Annotated[int, at_least(0)]
PositiveFloat = Annotated[float, above(0), finite]


def field_comments(cls: type) -> dict[str, str]:
  """The comment block above each field in ``cls``'s source, joined into one line."""
  comments, block = {}, []
  for line in inspect.getsource(cls).splitlines():
    stripped = line.strip()
    if stripped.startswith("#"):
      block.append(stripped.lstrip("#").strip())
      continue
    field = re.match(r"(\w+)\s*:", stripped)
    if field and block:
      comments[field.group(1)] = " ".join(block)
    block = []
  return comments


def _converter(tp: Any) -> Callable[[str], Any]:
  """The argparse ``type`` for annotation ``tp``: parse, then run its checks."""
  checks: list[Check] = []
  if typing.get_origin(tp) is Annotated:
    tp, *checks = typing.get_args(tp)
  if typing.get_origin(tp) is tuple:
    item = _converter(typing.get_args(tp)[0])

    def convert_items(text: str) -> tuple[Any, ...]:
      parts = text.split(",")
      if not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
      return tuple(item(p.strip()) for p in parts)

    return convert_items

  def convert(text: str) -> Any:
    try:
      value = tp(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None
    for check in checks:
      problem = check(value)
      if problem:
        raise argparse.ArgumentTypeError(f"{problem}, got {text}")
    return value

  return convert


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
  """A parser with one flag per field of ``cls``; flags not given are left out."""
  parser = argparse.ArgumentParser(description=description)
  hints = typing.get_type_hints(cls, include_extras=True)
  comments = field_comments(cls)
  for field in dataclasses.fields(cls):
    tp, flag = hints[field.name], "--" + field.name.replace("_", "-")
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # T | None
      tp = next(a for a in typing.get_args(tp) if a is not type(None))
    default = field.default
    help_text = comments.get(field.name, "")
    if not isinstance(default, bool) and default not in (None, (), ""):
      help_text += f" (default: {default})"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    if tp is bool:
      action = "store_false" if default else "store_true"
      flag = f"--no-{flag[2:]}" if default else flag
      parser.add_argument(flag, dest=field.name, action=action, **kwargs)
    elif typing.get_origin(tp) is Literal:
      choices = typing.get_args(tp)
      parser.add_argument(flag, choices=choices, type=type(choices[0]), **kwargs)
    else:
      bare = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
      metavar = "V1,V2,..." if typing.get_origin(bare) is tuple else None
      parser.add_argument(flag, type=_converter(tp), metavar=metavar, **kwargs)
  return parser


def parse(
    cls: type[T],
    argv: Sequence[str] | None,
    description: str,
    check: Callable[[T, Collection[str]], T] | None = None,
) -> T:
  """Parses ``argv`` into ``cls``; ``check(config, flags_given)`` may refine it.

  A ``ValueError`` from ``check`` (a conflict between flags, say) becomes an
  argparse error, so every flag error reads the same way.
  """
  parser = build_parser(cls, description)
  given = vars(parser.parse_args(argv))
  config = cls(**given)
  if check is not None:
    try:
      config = check(config, frozenset(given))
    except ValueError as error:
      parser.error(str(error))
  return config
