"""Loading tools, describing them to the policy, and calling them without ever crashing a rollout.

A tool is a plain Python function with type hints and a Google-style docstring (`Args:`), the convention
`transformers.utils.get_json_schema` and chat templates' `tools=` use, so the same function serves both.
The rollout loop must survive whatever the policy writes: `ToolRunner.call` turns every failure (unknown
tool, wrong arguments, an exception, a timeout) into an error result the policy reads, never an exception.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..infra.imports import first_line, import_object


@dataclass
class ToolCall:
    """One call parsed from the policy's text: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    """What the tool answered, as text for the policy. `error`: the text is an "error: ..." line."""

    text: str
    error: bool = False
    timed_out: bool = False


def load_tools(tools: list[str | Callable]) -> list[Callable]:
    """Resolve a config's tool list (dotted paths or callables) into functions with distinct names.

    The name a policy calls a tool by is its `__name__`, so two tools with one name would be ambiguous.
    """
    if isinstance(tools, (str, bytes)) or not hasattr(tools, "__iter__"):
        raise ValueError(f"tools must be a list of dotted paths or callables, got {type(tools).__name__}")
    loaded: list[Callable] = []
    seen: dict[str, str | Callable] = {}
    for entry in tools:
        fn = import_object(entry, "tool") if isinstance(entry, str) else entry
        if not callable(fn) or inspect.isclass(fn) or inspect.ismodule(fn):
            raise ValueError(f"tool {entry!r} is not a function (got {type(fn).__name__})")
        name = getattr(fn, "__name__", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"tool {entry!r} has no usable __name__ (define it with def, not a lambda or partial)")
        if name in seen:
            raise ValueError(f"tool {entry!r}: the name {name!r} is taken by {seen[name]!r}; tool names must differ")
        seen[name] = entry
        loaded.append(fn)
    return loaded


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """The JSON schema of each tool (what chat templates render for `tools=`), via `get_json_schema`."""
    from transformers.utils import get_json_schema

    schemas = []
    for fn in tools:
        name = getattr(fn, "__name__", repr(fn))
        try:
            schemas.append(get_json_schema(fn))
        except Exception as err:
            raise ValueError(
                f"tool {name!r} has no usable JSON schema ({first_line(err)}); give it type hints and a "
                "Google-style docstring with an Args: line per parameter"
            ) from err
    return schemas


class ToolRunner:
    """Calls tools by name with a wall-clock timeout, and never raises.

    Each call runs in a daemon thread that is waited on for `timeout_s`. Python cannot kill a thread, so a
    tool that hangs is ABANDONED: its thread keeps running (and holding what it holds) until it returns, and
    does not keep the process alive at exit. That is acceptable for pure functions (calculator) and for
    tools that do their own subprocess isolation and timeout (the `python` tool); a tool that can run forever
    in-process should not be used.

    `stats`: counts of calls, errors (including timeouts) and timeouts, for logging.
    """

    def __init__(self, tools: list[Callable], timeout_s: float = 5.0, max_chars: int = 1000):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
        self.tools: dict[str, Callable] = {fn.__name__: fn for fn in load_tools(tools)}
        self.timeout_s = float(timeout_s)
        self.max_chars = max_chars
        self.stats: dict[str, int] = {"calls": 0, "errors": 0, "timeouts": 0}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def _count(self, result: ToolResult) -> ToolResult:
        with self._lock:
            self.stats["calls"] += 1
            self.stats["errors"] += int(result.error)
            self.stats["timeouts"] += int(result.timed_out)
        return result

    def _error(self, message: str, timed_out: bool = False) -> ToolResult:
        line = " ".join(message.split())  # one line, whatever the exception said
        return self._count(ToolResult(self._truncate(f"error: {line}"), error=True, timed_out=timed_out))

    def _truncate(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars - 3] + "..."

    def call(self, call: ToolCall) -> ToolResult:
        """Run one call; every failure comes back as `ToolResult("error: ...", error=True)`."""
        fn = self.tools.get(getattr(call, "name", None))
        if fn is None:
            return self._error(f"unknown tool {getattr(call, 'name', call)!r} (tools: {', '.join(self.names)})")
        arguments = call.arguments
        if not isinstance(arguments, dict):
            return self._error(f"{call.name}: arguments must be an object, got {type(arguments).__name__}")
        try:
            inspect.signature(fn).bind(**arguments)
        except TypeError as err:
            return self._error(f"{call.name}: wrong arguments ({err})")
        except ValueError:  # no signature to check (a builtin): the call itself will tell
            pass
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fn(**arguments)
            except BaseException as err:  # noqa: B036 - a tool's SystemExit must not end the rollout either
                outcome["error"] = err

        thread = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            return self._error(f"{call.name}: timed out after {self.timeout_s:g} s", timed_out=True)
        if "error" in outcome:
            err = outcome["error"]
            return self._error(f"{call.name}: {first_line(err)}", timed_out=isinstance(err, TimeoutError))
        try:
            text = str(outcome.get("value"))
        except Exception as err:
            return self._error(f"{call.name}: its result cannot be turned into text ({first_line(err)})")
        return self._count(ToolResult(self._truncate(text)))
