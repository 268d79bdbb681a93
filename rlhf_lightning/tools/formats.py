"""How a tool call looks in the policy's text, and how the tool's answer is written back.

The rollout loop samples until `stop_token_id` (the call's end marker), asks `parse` for the call, runs it,
then appends `response_text` (tokens the policy attends to but is not trained on) and lets the policy go on.
One marker TOKEN ends a call so the loop can stop a row on a single id check, without decoding every step.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from .runner import ToolCall

_CHAR_CALL_START = re.compile(r"\[\s*([A-Za-z_][A-Za-z0-9_]*)\s*:")  # "[name:" opens a char-format call


def _single_token_id(tokenizer: Any, marker: str, fmt: str) -> int:
    """The id of `marker` when it is exactly one (known) token in `tokenizer`, else a one-line ValueError."""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(
            f"tool_format {fmt!r}: its end marker {marker!r} is {len(ids)} tokens in tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r}, not one known token; use another tool_format"
        )
    return int(ids[0])


class ToolFormat:
    """The interface the rollout loop calls; subclasses fix the text of a call and of its answer."""

    name: str = ""
    end_marker: str = ""

    def stop_token_id(self, tokenizer: Any) -> int:
        """The one token id whose sampling completes a call (the loop stops a row there)."""
        return _single_token_id(tokenizer, self.end_marker, self.name)

    def parse(self, text: str) -> ToolCall | str | None:
        """A turn's text ending at the stop token -> its last call, an "error: ..." string, or None (no call)."""
        raise NotImplementedError

    def response_text(self, tokenizer: Any, result: str) -> str:
        """The text appended after the call: the tool's answer, in this format."""
        raise NotImplementedError

    def system_text(self, schemas: list[dict]) -> str | None:
        """Text describing the tools to the policy, or None when the format has none (or the template does it)."""
        return None


class CharToolFormat(ToolFormat):
    """For the built-in char tokenizer: a call is `[name: argument]`, ended by the single character `]`.

    A tool with one parameter takes the argument text as that parameter: `[calculator: 123*456]` ->
    `{"expression": "123*456"}`. Any other tool takes a JSON object: `[f: {"a": 1, "b": 2}]` (a tool with no
    parameters: `[f: ]`). The answer is `"=" + result + "\\n"`, so `[calculator: 12*3]=36\\n36` is a whole
    exchange (policy text, tool text, policy text). Since `]` ends the call, an argument cannot contain `]`
    (no JSON lists). Text in brackets that does not start with `name:` is not a call (`[1, 2]` -> None).
    """

    name = "char"
    end_marker = "]"

    def __init__(self, tools: list[Callable] = ()):
        self.params: dict[str, list[str]] = {}
        for fn in tools:
            try:
                self.params[fn.__name__] = list(inspect.signature(fn).parameters)
            except (TypeError, ValueError, AttributeError) as err:
                raise ValueError(f"tool {fn!r}: cannot read its signature ({err})") from None

    def parse(self, text: str) -> ToolCall | str | None:
        end = text.rfind("]")
        if end < 0:
            return None
        opened = [m for m in _CHAR_CALL_START.finditer(text, 0, end) if "]" not in text[m.start() : end]]
        if not opened:  # "[1, 2]" is not a call; "[calculator 1+2]" was meant as one
            start = text.rfind("[", 0, end)
            words = text[start + 1 : end].split() if start >= 0 else []
            if words and words[0] in self.params:
                return f"error: a call is written [name: argument], got {text[start : end + 1]}"
            return None
        name, argument = opened[-1].group(1), text[opened[-1].end() : end]
        argument = argument.strip()
        params = self.params.get(name)
        if params is not None and len(params) == 1:
            return ToolCall(name, {params[0]: argument})
        if params == [] and argument in ("", "{}"):
            return ToolCall(name, {})
        try:
            arguments = json.loads(argument)
        except json.JSONDecodeError as err:
            return f"error: the argument of {name} must be a JSON object ({err.msg})"
        if not isinstance(arguments, dict):
            return f"error: the argument of {name} must be a JSON object, got {type(arguments).__name__}"
        return ToolCall(name, arguments)

    def response_text(self, tokenizer: Any, result: str) -> str:
        return "=" + result + "\n"


class HermesToolFormat(ToolFormat):
    """Qwen2.5 / Hermes style: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

    `</tool_call>` must be one token (an added token in such tokenizers). The answer is rendered by the
    tokenizer's own chat template, so it matches what the model saw in its tool-use training, whatever the
    family: the turn is closed, the tool message rendered, and the assistant turn opened again.
    """

    name = "hermes"
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def parse(self, text: str) -> ToolCall | str | None:
        start = text.rfind(self.start_marker)
        if start < 0:
            return None
        body = text[start + len(self.start_marker) :]
        end = body.find(self.end_marker)
        body = (body[:end] if end >= 0 else body).strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            return f"error: the tool call is not valid JSON ({err.msg} at character {err.pos})"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return 'error: a tool call is a JSON object {"name": ..., "arguments": {...}}'
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return f"error: the arguments of {call['name']} are not a JSON object"
        if not isinstance(arguments, dict):
            return f"error: the arguments of {call['name']} must be a JSON object, got {type(arguments).__name__}"
        return ToolCall(call["name"], arguments)

    def response_text(self, tokenizer: Any, result: str) -> str:
        return chat_reply_text(tokenizer, "tool", result, "tool_format 'hermes'")


_MARK = "\u2063RLHF_TURN_END\u2063"  # text no real conversation contains


def chat_reply_text(tokenizer: Any, role: str, content: str, what: str, after_eos: bool = False) -> str:
    """The text the tokenizer's chat template writes after an assistant turn for a `role` message of `content`,
    up to and including the opening of the next assistant turn. `after_eos`: the assistant's turn already ended
    with the EOS token (an environment answers a finished turn), so a leading EOS text is left out."""
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARK},
                {"role": role, "content": content}]
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:
        raise ValueError(f"{what}: the chat template cannot render a {role} message ({err})") from err
    if rendered.count(_MARK) != 1:
        raise ValueError(f"{what}: the chat template does not render the assistant's content as is")
    text = rendered.split(_MARK, 1)[1]
    eos = getattr(tokenizer, "eos_token", None)
    if after_eos and eos and text.startswith(eos):
        text = text[len(eos):]
    return text


def _is_char_tokenizer(tokenizer: Any) -> bool:
    """The built-in char tokenizer, fresh or saved with a model (then its name is the directory): its vocabulary."""
    from ..tokenizer import CHARS, SPECIAL_TOKENS

    if getattr(tokenizer, "name_or_path", None) == "char":
        return True
    get_vocab = getattr(tokenizer, "get_vocab", None)
    return get_vocab is not None and get_vocab() == {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}


def get_tool_format(name: str, tokenizer: Any, tools: list[Callable] = ()) -> ToolFormat:
    """"char" | "hermes" | "auto" -> a format checked against `tokenizer` (its end marker is one token).

    auto: hermes when the chat template knows `<tool_call>`, char for the built-in char tokenizer.
    """
    if name == "auto":
        template = getattr(tokenizer, "chat_template", None)
        template = json.dumps(template) if isinstance(template, (dict, list)) else str(template or "")
        if "<tool_call>" in template:
            name = "hermes"
        elif _is_char_tokenizer(tokenizer):
            name = "char"
        else:
            raise ValueError(
                f"tool_format 'auto' cannot tell the tool-call format of tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '?')!r}; set tool_format to 'char' or 'hermes'"
            )
    if name == "char":
        fmt: ToolFormat = CharToolFormat(tools)
    elif name == "hermes":
        fmt = HermesToolFormat()
    else:
        raise ValueError(f"tool_format must be 'char', 'hermes' or 'auto', got {name!r}")
    fmt.stop_token_id(tokenizer)  # fail at setup, not at the first call
    return fmt
