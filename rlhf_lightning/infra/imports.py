"""One rule for turning an import path from a config into the object it names (reward functions, tools)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(spec: str, what: str) -> Any:
    """"package.module.function", "package.module.Class.method" or "package.module:attr.path" -> the object.

    Without a colon the longest importable module prefix wins ("a.b.c" tries module "a.b", then "a"). Every failure
    is one ValueError line that starts with `what` and the spec (e.g. "tool 'x.y': ...").
    """
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
        candidates = [(module_name, attr_path.split("."))]
    else:
        parts = spec.split(".")
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    if not candidates or not all(name and all(attrs) for name, attrs in candidates):
        raise ValueError(f"{what} {spec!r} is not a dotted path like 'package.module.function'")
    for module_name, attrs in candidates:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                continue  # this prefix is not a module; try a shorter one
            raise ValueError(f"{what} {spec!r}: importing {module_name!r} failed: {first_line(err)}") from err
        except Exception as err:
            raise ValueError(f"{what} {spec!r}: importing {module_name!r} failed: {first_line(err)}") from err
        for attr in attrs:
            if not hasattr(obj, attr):
                raise ValueError(f"{what} {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"{what} {spec!r}: cannot import module {candidates[0][0]!r}")


def first_line(err: BaseException) -> str:
    """"Type: first line of the message" ("Type" alone without one): how a user's exception is named inside our
    one-line errors (its message can span lines; ours are one line)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
