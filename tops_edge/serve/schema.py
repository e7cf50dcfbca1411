"""The chat-completion request: OpenAI's fields that this server implements, its own pruning fields,
and the messages turned into one image and a prompt for the pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ApiError, bad_request

MAX_STOP = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields and fields of the wrong type are refused (422)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[Any] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's, accepted at the value that means "off"
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    # tops-serve's own: the visual-token budget and the selector, per request
    keep: int | None = Field(default=None, ge=1)
    keep_ratio: float | None = Field(default=None, gt=0, le=1)
    selector: str | None = None
    budget: Literal["proportional", "global"] | None = None


_OFF = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,),
        "top_logprobs": (0,)}


def parse_request(body: bytes) -> ChatRequest:
    """The body as a ChatRequest: malformed JSON is 400, a schema error 422 (param: the field)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, got {type(data).__name__}", "invalid_json")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    for name, off in _OFF.items():
        value = getattr(request, name)
        if value is not None and value not in off:
            raise bad_request(f"{name}={value!r} is not supported by tops-serve (only {off[0]!r})", "unsupported", name)
    if request.response_format is not None and request.response_format.get("type") != "text":
        raise bad_request("response_format: only {\"type\": \"text\"} is supported", "unsupported", "response_format")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(422, f"stop takes up to {MAX_STOP} non-empty strings", param="stop", code="invalid_type")
    if request.keep is not None and request.keep_ratio is not None:
        raise bad_request("pass keep or keep_ratio, not both", "invalid_input", "keep")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens differ; pass one", "invalid_input", "max_tokens")
    return request


def _schema_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        message = f"unknown field '{field}' (tops-serve's fields: docs/serve.md)"
        return ApiError(422, message, param=field, code="unknown_field")
    if first["type"] == "missing":
        return ApiError(422, f"'{field}' is required", param=field, code="missing_field")
    if sum(1 for e in errors if e["loc"] and str(e["loc"][0]) == field) > 1:  # a union: no one member's message
        return ApiError(422, f"{field}: {_EXPECTED.get(field, 'wrong type')}, got {_kind(first.get('input'))}",
                        param=field, code="invalid_type")
    where = ".".join(str(x) for x in first["loc"])
    return ApiError(422, f"{where}: {first['msg']}, got {_kind(first.get('input'))}", param=field, code="invalid_type")


_EXPECTED = {"stop": "a string or a list of strings"}


def _kind(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Conversation:
    """What the pipeline is asked: the image URL, and either one user question (`raw` False: the
    pipeline adds the chat template, as `Pipeline.generate(image, question)`) or a whole templated
    conversation (`raw` True)."""

    image_url: str
    prompt: str
    raw: bool


ROLES = ("system", "developer", "user", "assistant")


def conversation(messages: list, apply_template) -> Conversation:
    """OpenAI messages -> the image and the prompt. Exactly one image, in a user message. One user
    message is asked as its question; several turns (or a system message) go through the model's chat
    template (`apply_template(turns)` -> text) as one raw prompt."""
    turns, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(422, f"{where} must be an object with 'role' and 'content'", param="messages",
                           code="invalid_type")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise ApiError(422, f"{where}: unknown field '{unknown[0]}'", param="messages", code="unknown_field")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(422, f"{where}.role must be one of {', '.join(ROLES)}, got {_kind(role)}", param="messages",
                           code="invalid_type")
        texts, turn_images = [], []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list) and content:
            for j, part in enumerate(content):
                texts_or_image = _part(part, f"{where}.content[{j}]")
                (turn_images if texts_or_image[0] == "image" else texts).append(texts_or_image[1])
        else:
            raise ApiError(422, f"{where}.content must be a string or a non-empty list of parts, got {_kind(content)}",
                           param="messages", code="invalid_type")
        if turn_images and role != "user":
            raise bad_request(f"{where}: images go in user messages, not {role} ones", "invalid_image", "messages")
        images += turn_images
        turns.append((role, texts, len(turn_images)))
    if not images:
        raise bad_request("this model answers about an image: add one image_url part to a user message",
                          "missing_image", "messages")
    if len(images) > 1:
        raise bad_request(f"this model takes one image per request, got {len(images)}", "too_many_images", "messages")
    if turns[-1][0] != "user":
        raise bad_request("the last message must be the user's", "invalid_input", "messages")
    if len(turns) == 1:
        return Conversation(images[0], " ".join(turns[0][1]), raw=False)
    chat = []
    for role, texts, n_images in turns:
        role = "system" if role == "developer" else role
        parts = [{"type": "image"}] * n_images + [{"type": "text", "text": t} for t in texts]
        chat.append({"role": role, "content": parts})
    return Conversation(images[0], apply_template(chat), raw=True)


def _part(part, where: str) -> tuple[str, str]:
    if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
        raise ApiError(422, f"{where} must be a {{\"type\": \"text\"}} or {{\"type\": \"image_url\"}} part",
                       param="messages", code="invalid_type")
    if part["type"] == "text":
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise ApiError(422, f"{where}: a text part is {{\"type\": \"text\", \"text\": STRING}}", param="messages",
                           code="invalid_type")
        return "text", part["text"]
    image = part.get("image_url")
    if isinstance(image, str):  # some clients send the URL itself
        image = {"url": image}
    if not isinstance(image, dict) or not isinstance(image.get("url"), str) or set(image) - {"url", "detail"} \
            or set(part) - {"type", "image_url"}:
        raise ApiError(422, f"{where}: an image part is {{\"type\": \"image_url\", \"image_url\": {{\"url\": URL}}}}",
                       param="messages", code="invalid_type")
    return "image", image["url"]


def stop_strings(request: ChatRequest) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
