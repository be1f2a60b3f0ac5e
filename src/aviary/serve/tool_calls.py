"""Tool calling and structured output for `/v1/chat/completions`: a request's `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format` -> the prompt's messages, the grammar the reply follows, and
the calls parsed out of the reply.

    tools, tool_choice "auto"          the tools in the system prompt (chat_format.tools_prompt); the model writes
                                       text or ```json {"name": ..., "arguments": {...}} ``` blocks, and the
                                       blocks that name a tool become `tool_calls` (ToolCallParser)
    tool_choice "required" / named     the same, with the reply constrained to call blocks whose arguments match
                                       the function's `parameters` schema (one block unless parallel_tool_calls)
    tool_choice "none"                 no tools in the prompt, no parsing
    response_format json_object        the reply constrained to one JSON object; json_schema: to the schema
                                       (with tools "auto": a JSON value or call blocks)

A constrained reply starts where the chat format's answer starts (`ChatFormat.answer_start`), with thinking off:
the grammar decides everything the model writes. The call syntax is the G1 templates' (aviary.chat_format).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aviary.chat_format import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ChatFormat,
    ChatMessage,
    tool_call_text,
    tool_output_message,
    tools_prompt,
)
from aviary.serve.protocol import ApiError

if TYPE_CHECKING:
    from aviary.generation.constraints import Grammar, Grammars

__all__ = ["ChatPlan", "ToolCallParser", "grammar_param", "plan_chat"]


@dataclass
class ChatPlan:
    messages: list[ChatMessage]
    effort: str | None  # the reasoning effort to render with ("none" when the reply is constrained)
    grammar: Grammar | None = None  # the reply follows it
    tool_names: frozenset[str] = field(default_factory=frozenset)  # calls of these are parsed out of the reply


def grammar_param(req) -> str | None:
    """The request field that needs a grammar (and so llguidance), or None: response_format json_*, or a
    tool_choice that forces a call."""
    if req.response_format is not None and req.response_format.type != "text":
        return "response_format"
    if req.tools and req.tool_choice is not None and req.tool_choice not in ("none", "auto"):
        return "tool_choice"
    return None


def plan_chat(req, chat_format: ChatFormat, grammars: Grammars | None) -> ChatPlan:
    """Check the request's tool and format fields (ApiError 400 naming the field) and plan the reply.
    `grammars`: an aviary.generation.constraints.Grammars, needed when `grammar_param(req)` is not None."""
    functions = _check_tools(req)
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    offered = functions if choice != "none" else {}
    messages = _messages(req)
    if offered:
        messages = [ChatMessage("system", tools_prompt(list(offered.values()))), *messages]
    schema = _response_schema(req)
    if choice in ("none", "auto"):
        callable_ = list(offered)  # calls the reply may make, as an alternative to the JSON reply
    else:
        callable_ = list(offered) if choice == "required" else [choice.function.name]
        schema = False  # the reply is calls only
    if schema is False and choice in ("none", "auto"):
        return ChatPlan(messages, req.effort(), tool_names=frozenset(offered))
    from aviary.generation.constraints import GrammarError, json_rule, literal

    rules, alternatives = [], []
    for i, name in enumerate(callable_):
        head = literal(TOOL_CALL_OPEN + '{"name":' + json.dumps(name) + ',"arguments":')
        rules += [f"call{i}: {head} args{i} {literal('}' + TOOL_CALL_CLOSE)}",
                  json_rule(f"args{i}", offered[name].get("parameters") or {"type": "object"})]
    if callable_:
        rules.append("call: " + " | ".join(f"call{i}" for i in range(len(callable_))))
        one_call = req.parallel_tool_calls is False or not isinstance(choice, str)  # a named function: once
        alternatives.append("call" if one_call else 'call ("\\n" call)*')
    if schema is not False:
        rules.append(json_rule("value", schema))
        alternatives.append("value")
    text = f"start: {literal(chat_format.answer_start())} ({' | '.join(alternatives)})\n" + "\n".join(rules)
    try:
        grammar = grammars.lark(text)
    except GrammarError as e:
        raise ApiError(400, f"The JSON schema cannot be used: {e}", param=_culprit(grammars, offered),
                       code="invalid_schema") from None
    return ChatPlan(messages, "none", grammar, frozenset(offered))


def _culprit(grammars, offered: dict[str, dict]) -> str:
    """The field whose schema llguidance refused: a tool's parameters, else the response format's."""
    from aviary.generation.constraints import GrammarError

    for i, f in enumerate(offered.values()):
        try:
            grammars.json(f.get("parameters"))
        except GrammarError:
            return f"tools.{i}.function.parameters"
    return "response_format"


def _check_tools(req) -> dict[str, dict]:
    """name -> the function object, in the request's order."""
    if req.tool_choice is not None and not req.tools and req.tool_choice != "none":
        raise ApiError(400, "tool_choice is only allowed when tools are given.", param="tool_choice",
                       code="invalid_value")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(req.tools or ()):
        f = tool.function
        if f.name in functions:
            raise ApiError(400, f"Two tools are named '{f.name}'.", param=f"tools.{i}.function.name",
                           code="invalid_value")
        if f.parameters is not None and f.parameters.get("type", "object") != "object":
            raise ApiError(400, "A function's parameters must be a JSON schema of type object.",
                           param=f"tools.{i}.function.parameters", code="invalid_value")
        functions[f.name] = {k: v for k, v in (("name", f.name), ("description", f.description),
                                               ("parameters", f.parameters)) if v is not None}
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str) and choice.function.name not in functions:
        raise ApiError(400, f"tool_choice names '{choice.function.name}', which is not one of the tools.",
                       param="tool_choice", code="invalid_value")
    return functions


def _response_schema(req):
    """The JSON schema the reply must match: a dict, None for any JSON object, or False (free text)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise ApiError(400, "json_schema goes with type 'json_schema'.", param="response_format.json_schema",
                           code="invalid_value")
        return False
    if fmt.type == "json_object":
        if fmt.json_schema is not None:
            raise ApiError(400, "json_schema goes with type 'json_schema'.", param="response_format.json_schema",
                           code="invalid_value")
        return None
    if fmt.json_schema is None:
        raise ApiError(400, "Missing required parameter: response_format.json_schema",
                       param="response_format.json_schema", code="missing_required_parameter")
    if fmt.json_schema.schema_ is None:
        raise ApiError(400, "Missing required parameter: response_format.json_schema.schema",
                       param="response_format.json_schema.schema", code="missing_required_parameter")
    return fmt.json_schema.schema_


def _messages(req) -> list[ChatMessage]:
    """The request's messages as chat messages: an assistant's tool calls written as the model writes them, a
    tool's result as a "Function output:" turn; each tool message must answer an earlier call."""
    messages, call_ids = [], set()
    for i, m in enumerate(req.messages):
        if m.role == "tool":
            if m.tool_call_id is None:
                raise ApiError(400, f"Missing required parameter: messages.{i}.tool_call_id",
                               param=f"messages.{i}.tool_call_id", code="missing_required_parameter")
            if m.tool_call_id not in call_ids:
                raise ApiError(400, f"The tool message answers '{m.tool_call_id}', which no earlier assistant "
                                    "message's tool_calls holds.", param=f"messages.{i}.tool_call_id",
                               code="invalid_value")
            messages.append(tool_output_message(m.text()))
            continue
        if m.tool_call_id is not None:
            raise ApiError(400, "Only a tool message has a tool_call_id.", param=f"messages.{i}.tool_call_id",
                           code="invalid_value")
        if m.tool_calls and m.role != "assistant":
            raise ApiError(400, "Only an assistant message has tool_calls.", param=f"messages.{i}.tool_calls",
                           code="invalid_value")
        content = m.text()
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError as e:
                    raise ApiError(400, f"The arguments are not JSON: {e}",
                                   param=f"messages.{i}.tool_calls.{j}.function.arguments",
                                   code="invalid_value") from None
                calls.append(tool_call_text(call.function.name, arguments))
                call_ids.add(call.id)
            content = "\n".join([content, *calls] if content.strip() else calls)
        messages.append(ChatMessage(m.role, content, m.reasoning_content or ""))
    return messages


class ToolCallParser:
    """Splits the answer text of one choice, streamed in pieces cut anywhere, into content and tool calls: a
    ```json block holding {"name": <one of `names`>, "arguments": {...}} is a call, anything else (other text,
    a block that is not such a call) is content. Text that may be the start of a block is held back until it is
    known; whitespace around the content is dropped, so the pieces add up to the whole reply's content."""

    def __init__(self, names: frozenset[str]):
        self.names, self.pending = names, ""
        self.started, self.space = False, ""  # as ReplySplitter: leading whitespace dropped, trailing held

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content delta, calls completed by this piece)."""
        self.pending += text
        content, calls = "", []
        while True:
            at = self.pending.find("```")
            if at < 0:
                keep = next((n for n in range(min(len(self.pending), 2), 0, -1) if self.pending.endswith("``"[:n])),
                            0)
                content += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content, self.pending = content + self.pending[:at], self.pending[at:]
            if len(self.pending) < len(TOOL_CALL_OPEN) and TOOL_CALL_OPEN.startswith(self.pending):
                break  # perhaps a block: wait for more
            if not self.pending.startswith(TOOL_CALL_OPEN):
                content, self.pending = content + "```", self.pending[3:]
                continue
            end = self.pending.find("```", len(TOOL_CALL_OPEN))
            if end < 0:
                break  # a block, not closed yet
            block, self.pending = self.pending[:end + 3], self.pending[end + 3:]
            call = self._call(block[len(TOOL_CALL_OPEN):-3])
            if call is None:
                content += block
            else:
                calls.append(call)
        return self._give(content), calls

    def finish(self) -> str:
        """The content still held back, at the end of the reply (an unclosed block is content)."""
        content, self.pending = self.pending, ""
        return self._give(content)

    def _call(self, body: str) -> dict | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not (isinstance(value, dict) and value.get("name") in self.names
                and isinstance(value.get("arguments", {}), dict)):
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": value["name"],
                             "arguments": json.dumps(value.get("arguments", {}), ensure_ascii=False,
                                                     separators=(",", ":"))}}

    def _give(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body):]
        return body

