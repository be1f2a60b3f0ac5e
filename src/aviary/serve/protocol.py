"""The OpenAI request bodies this server accepts, and its error JSON.

Requests are validated strictly: unknown fields, wrong types ("1" for a number, true for an integer) and
out-of-range values are refused with `{"error": {"message", "type", "param", "code"}}` and a 4xx status.
OpenAI fields this server does not implement are accepted only with their neutral value (`echo: false`,
`logprobs: null`, ...), so clients that always send them still work. `top_k`, `min_p` and `penalty_decay`
are extensions (the reference RWKV sampler's settings).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "error_body", "lone_surrogate_error", "validation_error"]


class ApiError(Exception):
    """An error to send as OpenAI error JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    # a message may quote the client's text: a lone surrogate in it would make the JSON unencodable
    message, param = (x.encode("utf-8", "replace").decode("utf-8") if x else x for x in (message, param))
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def lone_surrogate_error(data: Any) -> ApiError | None:
    """A 400 naming the first field of decoded JSON whose text is not valid Unicode, or None.

    JSON may spell a lone surrogate ("\\ud800"); Python decodes it into a str that cannot be encoded as UTF-8,
    so no tokenizer can take it (World raises UnicodeEncodeError, 20B TypeError). Field names count too.
    """
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:  # depth first, in document order; no recursion (the JSON may be nested a thousand deep)
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return _surrogate_error(path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        children = []
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and not _is_unicode(key):
                return _surrogate_error(path, "a field name in ")
            if isinstance(item, (str, dict, list)):
                children.append(((*path, key), item))
        stack.extend(reversed(children))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_error(path: tuple, where: str = "") -> ApiError:
    param = ".".join(str(x) for x in path) or None
    return ApiError(400, f"Invalid value for {where}{param or 'the request body'}: the text contains a lone "
                         "surrogate (U+D800-U+DFFF), which is not valid Unicode.", param=param, code="invalid_value")


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def validation_error(e: ValidationError) -> ApiError:
    """The most specific problem pydantic found (the deepest field), as a 400 naming the field."""

    def path(err) -> list:  # without the union-member tags pydantic adds ("list[str]", "constrained-str", "Message")
        return [x for x in err["loc"] if isinstance(x, int) or (x.isidentifier() and x not in _TYPE_NAMES
                                                               and not x[:1].isupper())]

    errors = e.errors(include_url=False)
    err = max(errors, key=lambda err: len(path(err)))  # the first of the deepest
    loc = path(err)
    param = ".".join(str(x) for x in loc) or None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if err["type"] == "missing":
        return ApiError(400, f"Missing required parameter: {param}", param=param, code="missing_required_parameter")
    return ApiError(400, f"Invalid value for {param}: {err['msg']}", param=param, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions. The sampling fields are the `SamplingParams`
    settings marked `api` (aviary.generation.params), by the same names, which the app maps from `SETTINGS`;
    the ranges here are OpenAI's, and SamplingParams checks its own as well."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1, max_length=256)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=4)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    user: str | None = None
    logit_bias: dict[str, Any] | None = None  # accepted only empty
    # extensions: the reference RWKV sampler's settings
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    penalty_decay: Annotated[float, Field(ge=0, le=1)] | None = None

    def unsupported(self) -> str | None:
        """The first field set to a value this server cannot honour."""
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default for completions
    echo: Literal[False] | None = None
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class FunctionCall(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    arguments: str  # JSON text


class ToolCall(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant reply's reasoning, as this server returned it
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # a tool message's call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None


class FunctionDef(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object
    strict: bool | None = None  # calls that tool_choice forces always match `parameters`; others are parsed


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: Annotated[str, Field(pattern=_NAME)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow pydantic's method
    strict: bool | None = None  # the reply always matches the schema, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    # tool calling and structured output (aviary.serve.tool_calls)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: Literal[False] | None = None
    # thinking, for chat formats with reasoning (aviary.chat_format): "none" or enable_thinking false turns it
    # off; "low"/"medium"/"high" add the format's think-length hint. Ignored by formats without reasoning.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None  # vLLM's field; enable_thinking is the one it takes

    def effort(self) -> str | None:
        """The reasoning effort both fields ask for ("none": thinking off)."""
        off = self.chat_template_kwargs is not None and self.chat_template_kwargs.enable_thinking is False
        return "none" if off else self.reasoning_effort

