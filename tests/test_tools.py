"""Tools for multi-turn rollouts: the calculator and python tools, the runner that never raises, call formats."""

from __future__ import annotations

import time

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils import get_json_schema

from rlhf_lightning.tokenizer import CHARS, SPECIAL_TOKENS, build_char_tokenizer
from rlhf_lightning.tools import (
    CharToolFormat,
    HermesToolFormat,
    ToolCall,
    ToolResult,
    ToolRunner,
    calculator,
    get_tool_format,
    load_tools,
    python,
    run_python,
    tool_schemas,
)
from rlhf_lightning.tools.python_tool import unshare_works

# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize("expression, expected", [
    ("123*456", "56088"), ("2 + 3 * (4 - 1)", "11"), ("12/2", "6"), ("1/3", "0.3333333333"), ("0.1+0.2", "0.3"),
    ("7//2", "3"), ("-7 % 3", "2"), ("2**10", "1024"), ("2**-2", "0.25"), ("-(+5)", "-5"), ("1.5*2", "3"),
    ("10**63", str(10**63)), (" 42 ", "42"),
])
def test_calculator_values(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, culprit", [
    ("x + 1", "names"), ("__import__('os')", "function calls"), ("(1).real", "attribute"), ("abs(-1)", "calls"),
    ("9**9**9", "exponent"), ("10**65", "exponent"), ("999999**60", "too large"), ("10**60 * 10**60", "too large"),
    ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("0**-1", "division by zero"),
    ("1" * 201, "too long"), ("'a' * 3", "numbers"), ("True + 1", "numbers"), ("[1, 2]", "List"),
    ("1 < 2", "Compare"), ("(-8)**0.5", "complex"), ("1e999", "finite"), ("", "empty"), ("2 +", "not valid"),
])
def test_calculator_refuses_with_one_line(expression, culprit):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=culprit) as info:
        calculator(expression)
    assert "\n" not in str(info.value) and time.perf_counter() - start < 0.1  # bounded work, no 9**9**9


def test_calculator_schema():
    schema = get_json_schema(calculator)
    assert schema["function"]["name"] == "calculator"
    params = schema["function"]["parameters"]
    assert params["required"] == ["expression"] and params["properties"]["expression"]["type"] == "string"
    assert "123*456" in params["properties"]["expression"]["description"]


# ---------------------------------------------------------------- python tool


def test_python_prints_in_a_fresh_directory():
    assert python("print(sum(range(10)))") == "45\n"
    assert run_python("import os; print(os.listdir('.'))", timeout_s=5) == "[]\n"  # an empty directory
    long = run_python("print('a' * 10000)", timeout_s=5)
    assert len(long) == 4000 and long.endswith("[output truncated]")


def test_python_errors_raise_with_the_last_stderr_line():
    with pytest.raises(RuntimeError, match="ZeroDivisionError: division by zero"):
        run_python("x = 1\nprint(x / 0)", timeout_s=5)
    with pytest.raises(ValueError, match="code must be a string"):
        run_python(None)  # type: ignore[arg-type]


def test_python_infinite_loop_times_out_fast():
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        run_python("while True:\n    pass", timeout_s=0.5)
    with pytest.raises(TimeoutError):
        run_python("import time; time.sleep(30)", timeout_s=0.5)  # sleeping uses no CPU: the wall clock ends it
    assert time.perf_counter() - start < 5


def test_python_memory_bomb_fails():
    with pytest.raises(RuntimeError, match="MemoryError"):
        run_python("x = bytearray(4 * 1024**3)", timeout_s=5)


@pytest.mark.parametrize("isolate_network", [
    pytest.param(None, marks=pytest.mark.skipif(not unshare_works(), reason="unshare -rn is not allowed here")),
    False,  # the Python-level fallback
])
def test_python_has_no_network(isolate_network):
    code = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)"
    with pytest.raises(RuntimeError, match="OSError"):
        run_python(code, timeout_s=5, isolate_network=isolate_network)


# ---------------------------------------------------------------- runner


def sleepy(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def broken(text: str) -> str:
    """Always fails.

    Args:
        text: Ignored.
    """
    raise KeyError("no such thing\nsecond line")


def undocumented(x):
    return x


def test_runner_times_out_a_hung_tool_and_keeps_working():
    runner = ToolRunner([sleepy, add], timeout_s=0.2)
    start = time.perf_counter()
    result = runner.call(ToolCall("sleepy", {"seconds": 10}))
    assert time.perf_counter() - start < 1
    assert result.error and result.timed_out and result.text.startswith("error: sleepy: timed out")
    assert runner.call(ToolCall("add", {"a": 2, "b": 3})) == ToolResult("5")
    assert runner.call(ToolCall("sleepy", {"seconds": 0})) == ToolResult("awake")
    assert runner.stats == {"calls": 3, "errors": 1, "timeouts": 1}


def test_runner_turns_every_failure_into_error_text():
    runner = ToolRunner([add, broken, calculator], max_chars=60)
    assert runner.names == ["add", "broken", "calculator"]
    cases = {
        "unknown tool 'nope'": ToolCall("nope", {}),
        "wrong arguments": ToolCall("add", {"c": 1}),
        "add: wrong": ToolCall("add", {}),
        "must be an object": ToolCall("add", [1, 2]),  # type: ignore[arg-type]
        "KeyError": ToolCall("broken", {"text": "x"}),
        "calculator: ValueError": ToolCall("calculator", {"expression": "x"}),
    }
    for expected, call in cases.items():
        result = runner.call(call)
        assert result.error and not result.timed_out and result.text.startswith("error: "), call
        assert expected in result.text and "\n" not in result.text and len(result.text) <= 60, result.text
    assert runner.call(ToolCall("calculator", {"expression": "9" * 31 + "*" + "9" * 31})).text.endswith("...")
    assert runner.stats == {"calls": 7, "errors": 6, "timeouts": 0}


def test_load_tools_by_dotted_path():
    assert load_tools(["rlhf_lightning.tools.calculator", add]) == [calculator, add]
    assert load_tools(["rlhf_lightning.tools.python_tool.python", "rlhf_lightning.tools:calculator"]) == [
        python, calculator]
    assert ToolRunner(["rlhf_lightning.tools.calculator"]).names == ["calculator"]


@pytest.mark.parametrize("entry, culprit", [
    ("no_such_package_xyz.fn", "no_such_package_xyz.fn"), ("rlhf_lightning.tools.nope", "no attribute 'nope'"),
    ("rlhf_lightning.tools.python_tool", "not a function"), ("calculator", "not a dotted path"),
    (42, "not a function"), (lambda x: x, "__name__"),
])
def test_load_tools_errors_name_the_entry(entry, culprit):
    with pytest.raises(ValueError, match=culprit) as info:
        load_tools([entry])
    assert "\n" not in str(info.value)


def test_load_tools_name_collision():
    with pytest.raises(ValueError, match="'calculator' is taken"):
        load_tools([calculator, "rlhf_lightning.tools.calculator"])


def test_tool_schemas():
    schemas = tool_schemas([calculator, python, add])
    assert [s["function"]["name"] for s in schemas] == ["calculator", "python", "add"]
    assert schemas[2]["function"]["parameters"]["required"] == ["a"]
    with pytest.raises(ValueError, match="tool 'undocumented'"):
        tool_schemas([undocumented])


# ---------------------------------------------------------------- char format


def test_char_format_round_trip(char_tok):
    fmt = CharToolFormat([calculator, add])
    assert fmt.stop_token_id(char_tok) == char_tok.convert_tokens_to_ids("]")
    policy = "12*3 is [calculator: 12*3]"
    call = fmt.parse(policy)
    assert call == ToolCall("calculator", {"expression": "12*3"})
    result = ToolRunner([calculator]).call(call)
    exchange = policy + fmt.response_text(char_tok, result.text) + "36"
    assert exchange.endswith("[calculator: 12*3]=36\n36")
    assert char_tok.decode(char_tok(exchange, add_special_tokens=False)["input_ids"]) == exchange
    assert fmt.parse("[calculator: 1+1]=2\nthen [add: {\"a\": 1, \"b\": 2}]") == ToolCall("add", {"a": 1, "b": 2})


def test_char_format_malformed_and_no_call():
    fmt = CharToolFormat([calculator, add])
    assert fmt.parse("no call here") is None
    assert fmt.parse("the list [1, 2]") is None
    assert fmt.parse("[add: 1, 2]").startswith("error: the argument of add must be a JSON object")
    assert fmt.parse('[add: {"a": [1]').startswith("error: the argument of add")  # "]" ended it inside the JSON
    assert fmt.parse("[calculator: 1] and [1, 2]") is None
    assert fmt.parse("[calculator 1+2]").startswith("error: a call is written [name: argument]")
    assert fmt.parse("[other: {}]") == ToolCall("other", {})  # unknown names are the runner's to report


# ---------------------------------------------------------------- hermes format

QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


@pytest.fixture(scope="module")
def qwen_like_tok():
    """A char-level tokenizer with Qwen2.5's tool-use special tokens and a Qwen2.5-like chat template."""
    tokens = SPECIAL_TOKENS + QWEN_SPECIALS + CHARS
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS + QWEN_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                  unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = QWEN_LIKE_TEMPLATE
    tok.name_or_path = "tiny-qwen-like"
    return tok


def test_hermes_stop_token_and_parse_of_a_templated_call(qwen_like_tok):
    fmt = HermesToolFormat()
    end_id = fmt.stop_token_id(qwen_like_tok)
    assert end_id == qwen_like_tok.convert_tokens_to_ids("</tool_call>")
    messages = [{"role": "user", "content": "What is 12*3?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "calculator",
                                                                   "arguments": {"expression": "12*3"}}}]}]
    rendered = qwen_like_tok.apply_chat_template(messages, tools=tool_schemas([calculator]), tokenize=False)
    assert '"name": "calculator"' in rendered.split("# Tools")[1].split("<|im_end|>")[0]  # in the system message
    ids = qwen_like_tok(rendered, add_special_tokens=False)["input_ids"]
    turn = qwen_like_tok.decode(ids[: len(ids) - ids[::-1].index(end_id)])  # the policy stops at </tool_call>
    assert turn.endswith("</tool_call>")
    assert fmt.parse(turn) == ToolCall("calculator", {"expression": "12*3"})
    assert fmt.parse("<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>") == ToolCall(
        "f", {"a": 1})


def test_hermes_malformed_and_no_call():
    fmt = HermesToolFormat()
    assert fmt.parse("just an answer: 36") is None
    assert fmt.parse("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\n</tool_call>").startswith(
        "error: the tool call is not valid JSON")
    assert fmt.parse("<tool_call>\n[1, 2]\n</tool_call>").startswith("error: a tool call is a JSON object")
    assert fmt.parse('<tool_call>{"name": "f", "arguments": 3}</tool_call>').startswith("error: the arguments of f")


def test_hermes_response_text_from_the_template(qwen_like_tok):
    text = HermesToolFormat().response_text(qwen_like_tok, "36")
    assert text == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n36\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = qwen_like_tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == qwen_like_tok.convert_tokens_to_ids("<|im_end|>")


def test_get_tool_format(char_tok, qwen_like_tok):
    assert isinstance(get_tool_format("auto", qwen_like_tok, [calculator]), HermesToolFormat)
    char = get_tool_format("auto", char_tok, [calculator])
    assert isinstance(char, CharToolFormat) and char.parse("[calculator: 1]") == ToolCall(
        "calculator", {"expression": "1"})
    saved = build_char_tokenizer()
    saved.name_or_path = "runs/sft/version_0/hf_model"  # the char tokenizer saved with a model: known by its vocab
    assert isinstance(get_tool_format("auto", saved, [calculator]), CharToolFormat)
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    other.name_or_path = "some/model"
    with pytest.raises(ValueError, match="set tool_format"):
        get_tool_format("auto", other, [])
    with pytest.raises(ValueError, match="'</tool_call>' is 12 tokens"):
        get_tool_format("hermes", char_tok, [])
    with pytest.raises(ValueError, match="tool_format must be"):
        get_tool_format("json", char_tok, [])


def test_chat_prompts_describe_the_tools_through_the_template(tmp_path, qwen_like_tok):
    """Conversational prompts get the module's tool schemas in the chat template (its "# Tools" system block) when
    the tool format is the template's own; the char format has no template to describe them."""
    import json
    import types

    from rlhf_lightning import GRPOModule, PromptDataModule

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 12*3?"}], "answer": "36"}) + "\n")
    module = types.SimpleNamespace(tokenizer=qwen_like_tok, chat_tool_schemas=tool_schemas([calculator]))
    dm = PromptDataModule(path=str(data), val_fraction=0.0, batch_size=1, max_prompt_length=1024)
    dm.trainer = types.SimpleNamespace(lightning_module=module)
    dm.setup("fit")
    prompt = dm.train_rows[0]["prompts"]
    assert '"name": "calculator"' in prompt.split("# Tools")[1] and prompt.endswith("<|im_start|>assistant\n")
    module.chat_tool_schemas = None
    dm = PromptDataModule(path=str(data), val_fraction=0.0, batch_size=1, max_prompt_length=1024)
    dm.trainer = types.SimpleNamespace(lightning_module=module)
    dm.setup("fit")
    assert "# Tools" not in dm.train_rows[0]["prompts"]
    assert GRPOModule("tiny", tools=["rlhf_lightning.tools.calculator"]).chat_tool_schemas is None  # char format
