"""The intent engine's contract: a plain-language request in, a spec v1 intent out (no Dagster)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from codemind_dagster.domain.intent import CONTROL_RE, NAME_RE, Intent, IntentError, parse_intent_text

# The request ends up in spec.description's neighbourhood; more than this is a document, not a request.
MAX_REQUEST_CHARS = 20_000


class DraftInputError(ValueError):
    """A request the engine refuses before asking any model; the message says what is wrong."""


class DraftRequest(BaseModel):
    """What a product owner wrote, and the intent name they want, if any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    name: str | None = None


def make_request(text: str, name: str | None = None, *, source: str = "the request") -> DraftRequest:
    """A checked request: non-blank UTF-8 text without control characters, a valid name if one is given."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise DraftInputError(f"{source} is empty: describe the business need in plain words")
    if len(text) > MAX_REQUEST_CHARS:
        raise DraftInputError(f"{source} is {len(text)} characters; the limit is {MAX_REQUEST_CHARS}: "
                              "shorten it to the business need")
    m = CONTROL_RE.search(text)
    if m:
        raise DraftInputError(f"{source} contains the control character {m.group()!r} at offset {m.start()} "
                              "(binary or terminal escapes are not a request)")
    if name is not None and not NAME_RE.fullmatch(name):
        raise DraftInputError(f"intent name {name!r} must be a DNS-1123 label matching {NAME_RE.pattern} "
                              "(lowercase letters, digits and '-', at most 40 characters)")
    return DraftRequest(text=text, name=name)


class DraftIntent(Intent):
    """The intent model as a model's answer schema; an invalid answer fails as a hand-written file would."""

    # The JSON schema sent to models stays exactly the Intent's; errors carry no echo of the answer.
    model_config = ConfigDict(**Intent.model_config, title="Intent", hide_input_in_errors=True,
                              json_schema_extra={"description": Intent.__doc__})

    @model_validator(mode="wrap")
    @classmethod
    def _as_a_file(cls, data: Any, handler: Any) -> Any:
        # Checked by the parser `codemind intent submit` uses, so a re-ask carries the same
        # `YAML.PATH: what was expected` message a user would see.
        if not isinstance(data, BaseModel):
            try:
                parse_intent_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), "answer")
            except yaml.YAMLError as e:
                raise PydanticCustomError("intent_spec", "the answer is not plain JSON data: {error}",
                                          {"error": str(e).splitlines()[0]}) from None
            except IntentError as e:
                where = f"{e.path}: " if e.path else ""
                raise PydanticCustomError("intent_spec", "{error}", {"error": f"{where}{e.expected}"}) from None
        return handler(data)
