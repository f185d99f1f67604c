"""Similar past intents: the text that represents an intent for embedding, cosine similarity and top-k."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from codemind_dagster.domain.intent import Intent

# Bump when intent_text changes: stored vectors of the old text are then recomputed rather than reused.
TEXT_VERSION = "intent-text/1"


class Neighbour(BaseModel):
    """A stored intent similar to the one being planned."""

    name: str
    similarity: float
    summary: str


class EmbeddingError(ValueError):
    """A vector that cannot be compared: empty, not finite, or of another dimension than the query."""


def intent_text(intent: Intent) -> str:
    """What the model reads: purpose first, then entities and fields, then rules (the model keeps 256 tokens)."""
    s = intent.spec
    parts = [s.summary.strip()]
    if s.description:
        parts.append(" ".join(s.description.split()))
    for e in s.entities:
        fields = ", ".join(f"{f.name} ({f.to})" if f.type == "ref" else f.name for f in e.fields)
        parts.append(f"{e.name}: {fields}.")
    parts.extend(r.strip() for r in s.rules)
    return "\n".join(parts)


def embedding_hash(text: str) -> str:
    """The key of a stored vector: the text it embeds and how that text was built."""
    return hashlib.sha256(f"{TEXT_VERSION}\n{text}".encode()).hexdigest()


def intent_summary(intent: Intent) -> str:
    """A short line for prompts and the UI: entities with their fields, and the routes they get."""
    entities = "; ".join(f"{e.name}({', '.join(f.name for f in e.fields)})" for e in intent.spec.entities)
    routes = "; ".join(f"/{e.collection}: {','.join(e.operations)}" for e in intent.spec.entities)
    return f"{intent.spec.summary.strip()} Entities: {entities}. Routes: {routes}."


def vector_problem(vector: Sequence[float], dim: int) -> str | None:
    """Why a stored vector cannot be compared with vectors of `dim` dimensions, or None."""
    if len(vector) != dim:
        return f"has {len(vector)} dimensions, expected {dim}"
    if not all(math.isfinite(x) for x in vector) or not any(vector):
        return "is zero or not finite"
    return None


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors of the same dimension."""
    if len(a) != len(b) or not a:
        raise EmbeddingError(f"cannot compare a vector of {len(a)} dimensions with one of {len(b)}")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if not (math.isfinite(dot) and na > 0 and nb > 0):
        raise EmbeddingError("cannot compare a zero or non-finite vector")
    return dot / (na * nb)


def top_k(query: Sequence[float], candidates: Mapping[str, Sequence[float]], k: int) -> list[tuple[str, float]]:
    """The `k` most similar candidates, best first (ties by name, so the order is stable across runs).

    A linear scan in plain Python: a few hundred intents of 384 numbers is about 1 ms a hundred, far below one
    model call, and needs no vector index in SQLite or an extension in PostgreSQL.
    """
    if k <= 0:
        return []
    scored = [(name, cosine(query, vec)) for name, vec in candidates.items()]
    scored.sort(key=lambda p: (-p[1], p[0]))
    return scored[:k]


def render_neighbours(neighbours: Sequence[Neighbour]) -> str:
    """The neighbours as fenced data for a prompt; empty when there are none."""
    if not neighbours:
        return ""
    lines = [f"- {n.name} (cosine similarity {n.similarity:.2f}): {n.summary}" for n in neighbours]
    return ("<similar_intents>\nPast intents of this platform most similar to this one, for consistency of "
            "naming and structure; the intent above is what to implement.\n" + "\n".join(lines)
            + "\n</similar_intents>")
