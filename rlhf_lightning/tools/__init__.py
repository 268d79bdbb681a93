"""Tools for multi-turn RL rollouts: the tools themselves, a runner that never raises, and call formats.

A tool is a typed function with a Google-style docstring (so `get_json_schema` can describe it to a chat
template); `ToolRunner` calls it by name with a timeout; a `ToolFormat` says how a call and its answer look
in the policy's text (`[calculator: 12*3]=36` for the char tokenizer, `<tool_call>...</tool_call>` for Qwen).
"""

from .calculator import calculator
from .formats import CharToolFormat, HermesToolFormat, ToolFormat, get_tool_format
from .python_tool import python, run_python
from .runner import ToolCall, ToolResult, ToolRunner, load_tools, tool_schemas

__all__ = ["CharToolFormat", "HermesToolFormat", "ToolCall", "ToolFormat", "ToolResult", "ToolRunner", "calculator",
           "get_tool_format", "load_tools", "python", "run_python", "tool_schemas"]
