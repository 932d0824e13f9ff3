"""Tool calls for the chat contract: checking ``messages`` / ``tools`` / ``tool_choice``,
showing the tools to the model, and finding the calls in its reply.

A chat template that renders ``tools`` itself (Qwen, Llama 3.1, Hermes, ...) gets them
through ``apply_chat_template(tools=...)`` and the conversation in transformers' tool
format (assistant ``tool_calls`` with arguments as objects, ``tool`` messages). A template
with no tool format (SmolLM2's, the default model's) gets the Hermes convention, the most
common one in open models' training data: the tools described in the system message,
each call written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, tool
results as ``<tool_response>`` user turns.

Calls are read from the start of a reply: ``<tool_call>`` blocks, or a bare JSON call
(``{"name", "arguments"|"parameters"}``, or an array of them) as Llama-style models
write it. Text before a call makes the reply plain text; text after the calls is the
message content. ``tool_choice`` ``required`` or a function name constrains the reply
to calls with a grammar (:func:`call_grammar`), so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from triserve.backends.llm.guided import json_grammar
from triserve.core.errors import InferError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_PARALLEL_CALLS = 4


def _json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InferError.invalid(f"{name}: not valid JSON: {exc}") from None


def parse_tools(text: str | None) -> tuple[dict[str, Any], ...]:
    """The ``function`` objects of OpenAI tool definitions, checked."""
    if text is None:
        return ()
    tools = _json("tools", text)
    if not isinstance(tools, list):
        raise InferError.invalid("tools: expected a JSON array of tool definitions")
    functions, names = [], set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InferError.invalid(f'{where}: expected {{"type": "function", "function": {{"name": ...}}}}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InferError.invalid(f"{where}.function.name: 1 to 64 letters, digits, '_', '.' or '-', "
                                     f"got {name!r}")
        if name in names:
            raise InferError.invalid(f"{where}: a second tool named '{name}'")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InferError.invalid(f"{where}.function.parameters: expected a JSON schema object")
        names.add(name)
        functions.append({"name": name, "description": function.get("description") or "",
                          "parameters": parameters})
    return tuple(functions)


def parse_tool_choice(text: str | None, tools: tuple[dict[str, Any], ...]) -> str:
    """``auto`` | ``none`` | ``required`` | the name of one of ``tools``."""
    choice = "auto" if text is None else text.strip()
    if choice in ("auto", "none"):
        return choice
    if not tools:
        raise InferError.invalid(f"tool_choice: {choice!r} needs tools")
    if choice != "required" and choice not in {tool["name"] for tool in tools}:
        raise InferError.invalid(f"tool_choice: no tool named {choice!r}; the tools are "
                                 f"{', '.join(tool['name'] for tool in tools)}")
    return choice


def parse_messages(text: str | None) -> tuple[dict[str, Any], ...] | None:
    """``messages``: a JSON array of role/content messages, checked, in the order they came."""
    if text is None:
        return None
    messages = _json("messages", text)
    if not isinstance(messages, list) or not messages:
        raise InferError.invalid("messages: expected a non-empty JSON array of messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InferError.invalid(f"{where}: expected an object with 'role' and 'content'")
        role = message.get("role")
        if role not in _ROLES:
            raise InferError.invalid(f"{where}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        unknown = set(message) - {"role", "content", "tool_calls", "tool_call_id", "name"}
        if unknown:
            raise InferError.invalid(f"{where}: unsupported field(s) {', '.join(sorted(unknown))}")
        content = message.get("content")
        calls = message.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise InferError.invalid(f"{where}: missing 'content'")
        if content is not None and not isinstance(content, str):
            raise InferError.invalid(f"{where}.content: expected a string")
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if calls:
            if role != "assistant":
                raise InferError.invalid(f"{where}: only assistant messages carry tool_calls")
            entry["tool_calls"] = [_checked_call(f"{where}.tool_calls[{i}]", call) for i, call in enumerate(calls)]
        if role == "tool":
            entry["tool_call_id"] = str(message.get("tool_call_id") or "")
        if message.get("name") is not None:
            entry["name"] = str(message["name"])  # a template may show speaker names
        checked.append(entry)
    return tuple(checked)


def _checked_call(where: str, call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InferError.invalid(f'{where}: expected {{"id", "type": "function", "function": {{"name", "arguments"}}}}')
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise InferError.invalid(f"{where}.function.arguments: not valid JSON") from None
    return {"id": str(call.get("id") or ""), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders tools itself (it reads the ``tools`` variable)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def messages_with_tools(messages: list[dict[str, Any]], tools: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The conversation with the tools described in its system message (Hermes' wording)."""
    described = "\n".join(json.dumps({"type": "function", "function": tool}, ensure_ascii=False)
                          for tool in tools)
    instructions = (
        "You are a function calling AI model. You may call one or more functions to assist with the user "
        f"query. Here are the available tools: <tools>\n{described}\n</tools>\n"
        "For each function call, return a JSON object with the function name and arguments within "
        f'{CALL_OPEN}{CALL_CLOSE} tags:\n{CALL_OPEN}\n{{"name": <function-name>, "arguments": '
        f"<args-json-object>}}\n{CALL_CLOSE}")
    if messages and messages[0]["role"] in ("system", "developer"):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}"}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


def template_messages(messages: list[dict[str, Any]], knows_tools: bool) -> list[dict[str, Any]]:
    """Messages as a chat template reads them: ``developer`` is ``system``; without a tool
    format of the template's own, calls and results are written as Hermes' text."""
    out = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        entry = {**message, "role": role}
        if not knows_tools:
            if message.get("tool_calls"):
                calls = "\n".join(f"{CALL_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n{CALL_CLOSE}"
                                  for c in message["tool_calls"])
                entry = {"role": role, "content": "\n".join(part for part in (message["content"], calls) if part)}
            elif role == "tool":
                entry = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        out.append(entry)
    return out


def call_grammar(tools: tuple[dict[str, Any], ...], choice: str, parallel: bool) -> str:
    """A Lark grammar (llguidance) whose sentences are valid calls: of the named function, or
    (``required``) of any tool; up to a few calls when ``parallel``."""
    chosen = [tool for tool in tools if choice == "required" or tool["name"] == choice]
    schemas = [{"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": tool["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for tool in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    repeat = f'("\\n" call){{0,{_MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    return (f"start: call {repeat}\n"
            f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\n'
            f"body: {json_grammar(schema)}\n")


class ToolCallReader:
    """Watches a reply for calls while it streams: text goes out as it comes unless the reply
    may be starting with a call, which is then held back and parsed at the end."""

    def __init__(self, tools: tuple[dict[str, Any], ...]):
        self._names = {tool["name"] for tool in tools}
        self._text = ""
        self._held = ""
        self._streaming = False  # the reply is plain text: pass pieces through

    def feed(self, piece: str) -> str:
        """What of ``piece`` can be sent now."""
        self._text += piece
        if self._streaming:
            return piece
        start = self._text.lstrip()
        if not start or CALL_OPEN.startswith(start[: len(CALL_OPEN)]) or start[0] in "{[":
            self._held += piece
            return ""
        self._streaming = True
        held, self._held = self._held + piece, ""
        return held

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The held-back content (after any calls) and the calls, as the reply ends."""
        if self._streaming:
            return "", []
        content, calls = parse_tool_calls(self._text, self._names)
        return (content, calls) if calls else (self._held, [])

    @property
    def text(self) -> str:
        return self._text


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """The calls at the start of ``text`` and the content after them; ``(text, [])`` if none."""
    rest = text.lstrip()
    calls = []
    if rest.startswith(CALL_OPEN):
        while rest.startswith(CALL_OPEN):
            body, closed, after = rest[len(CALL_OPEN):].partition(CALL_CLOSE)
            call = _call(body.strip(), names)
            if call is None:
                return text, []
            calls.append(call)
            rest = after.lstrip()
            if not closed:
                break
        return rest, calls
    try:
        document, end = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        return text, []
    items = document if isinstance(document, list) else [document]
    for item in items:
        call = _call(item, names)
        if call is None:
            return text, []
        calls.append(call)
    return rest[end:].strip(), calls


def _call(body: Any, names: set[str]) -> dict[str, Any] | None:
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not isinstance(body, dict) or body.get("name") not in names:
        return None
    arguments = body.get("arguments", body.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": body["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
