"""Tools the model may call inside an episode's turn (README: Tools).

- `schema`: a declared tool (callable, (schema, callable), built-in name or spec) -> `Tool` with its OpenAI schema;
- `parsers`: the tool calls in a reply (hermes/Qwen, Llama 3 JSON, Mistral, or a user parser);
- `runner`: run a round's calls concurrently, each under a timeout, errors as results;
- `toolbox`: the tools and options of one environment; `audit`: the chat-template check; `stats`: the metrics;
- `builtin`: the built-in tools (calculator, python).
"""

from chatrl.tools.parsers import ToolCall
from chatrl.tools.runner import ToolResult
from chatrl.tools.schema import Tool, resolve_tools
from chatrl.tools.toolbox import ToolBox, ToolOptions, toolbox_for

__all__ = ["Tool", "ToolBox", "ToolCall", "ToolOptions", "ToolResult", "resolve_tools", "toolbox_for"]
