"""A BERT sentence encoder as an ONNX graph, written from its weights (no torch, no export).

:func:`bert_graph` turns the tensors of a Hugging Face ``BertModel`` (``model.safetensors``,
optionally overlaid by a ``promptcache fit --embedder`` tuning) into an ONNX model that ONNX
Runtime runs: embeddings, ``num_hidden_layers`` encoder layers (attention with the padding
mask, exact erf GELU, post-norm), then sentence-transformers' mean pooling over the real
tokens and L2 normalisation. Inputs ``input_ids`` and ``attention_mask`` (int64, batch x
tokens); outputs ``sentence`` (batch x hidden, unit rows) and ``hidden`` (the last layer, for
the first stage's distillation). Token types are all 0, as sentence-transformers sends them
for one text. The op set is 17 (``LayerNormalization``); ONNX Runtime fuses the attention,
GELU and normalisation patterns it recognises when it loads the graph.

Only what sentence-transformers' all-MiniLM family needs is covered: ``model_type`` bert,
absolute positions, GELU, mean pooling; anything else is refused with a clear error (the
``torch`` backend runs it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.cache.errors import ConfigError

OPSET = 17
#: What the padding mask adds to a masked score: float32's lowest, as transformers does.
MASKED = float(np.finfo(np.float32).min)


def check_supported(source: Path) -> dict[str, Any]:
    """``source``'s ``config.json`` if this builder can write its graph; ConfigError if not."""
    try:
        config = json.loads((source / "config.json").read_text())
        pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: not a sentence-transformers model directory ({exc})") from exc
    problems = []
    if config.get("model_type") != "bert":
        problems.append(f"model_type {config.get('model_type')!r} (only 'bert')")
    if config.get("position_embedding_type", "absolute") != "absolute":
        problems.append("relative positions")
    if config.get("hidden_act") != "gelu":
        problems.append(f"activation {config.get('hidden_act')!r}")
    if not pooling.get("pooling_mode_mean_tokens") or any(
            v for k, v in pooling.items() if k.startswith("pooling_mode_") and
            k != "pooling_mode_mean_tokens"):
        problems.append("pooling other than mean")
    if problems:
        raise ConfigError(f"{source}: the onnx embedding backend cannot run this model "
                          f"({'; '.join(problems)}); use --embed-backend torch")
    return dict(config)


class _Graph:
    """Nodes and initialisers under construction, with fresh names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, kind: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self._n += 1
        name = out or f"{kind.lower()}_{self._n}"
        self.nodes.append(self.helper.make_node(kind, list(inputs), [name],
                                                name=f"n{self._n}", **attrs))
        return name

    def linear(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        """``x @ W.T + b`` of the Linear layer ``prefix`` (its weight stored transposed)."""
        w = self.const(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T.astype(np.float32))
        b = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"].astype(np.float32))
        return self.op("Add", self.op("MatMul", x, w), b)

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], prefix: str,
                   eps: float) -> str:
        g = self.const(f"{prefix}.weight", weights[f"{prefix}.weight"].astype(np.float32))
        b = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"].astype(np.float32))
        return self.op("LayerNormalization", x, g, b, axis=-1, epsilon=eps)


def bert_graph(config: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
    """The ``onnx.ModelProto`` of the BERT encoder ``weights`` (named as in ``BertModel``'s
    state dict) with mean pooling and normalisation."""
    from onnx import TensorProto, helper

    g = _Graph()
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head = hidden // heads
    eps = float(config.get("layer_norm_eps", 1e-12))
    try:
        x = _embeddings(g, weights, eps)
        mask = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)  # (B, S)
        bias = g.op("Mul", g.op("Sub", g.const("one", np.array(1.0, np.float32)), mask),
                    g.const("masked", np.array(MASKED, np.float32)))
        bias = g.op("Unsqueeze", bias, g.const("axes_1_2", np.array([1, 2], np.int64)))
        split = g.const("split_heads", np.array([0, 0, heads, head], np.int64))
        merge = g.const("merge_heads", np.array([0, 0, hidden], np.int64))
        scale = g.const("scale", np.array(1 / math.sqrt(head), np.float32))
        for n in range(int(config["num_hidden_layers"])):
            x = _layer(g, weights, f"encoder.layer.{n}", x, bias, split, merge, scale, eps)
    except KeyError as exc:
        raise ConfigError(f"the model's weights have no tensor {exc}") from exc
    g.op("Identity", x, out="hidden")
    _mean_pool(g, x, mask)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])
    att = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"])
    outputs = [
        helper.make_tensor_value_info("sentence", TensorProto.FLOAT, ["batch", hidden]),
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "tokens", hidden]),
    ]
    graph = helper.make_graph(g.nodes, "promptcache-bert", [ids, att], outputs,
                              initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="promptcache")
    model.ir_version = 8
    return model


def _embeddings(g: _Graph, weights: dict[str, np.ndarray], eps: float) -> str:
    words = g.const("word_embeddings", weights["embeddings.word_embeddings.weight"]
                    .astype(np.float32))
    # token type 0 for every token: its row is folded into the position table
    positions = (weights["embeddings.position_embeddings.weight"] +
                 weights["embeddings.token_type_embeddings.weight"][0]).astype(np.float32)
    table = g.const("position_embeddings", positions)
    length = g.op("Shape", "input_ids", start=1, end=2)
    first = g.const("zero_1d", np.array([0], np.int64))
    used = g.op("Slice", table, first, length, first)  # rows 0 .. tokens-1
    x = g.op("Add", g.op("Gather", words, "input_ids"), used)
    return g.layer_norm(x, weights, "embeddings.LayerNorm", eps)


def _layer(g: _Graph, weights: dict[str, np.ndarray], p: str, x: str, bias: str,
           split: str, merge: str, scale: str, eps: float) -> str:
    def heads(name: str, perm: list[int]) -> str:
        return g.op("Transpose", g.op("Reshape", g.linear(x, weights, name), split), perm=perm)

    q = heads(f"{p}.attention.self.query", [0, 2, 1, 3])  # (B, H, S, d)
    k = heads(f"{p}.attention.self.key", [0, 2, 3, 1])  # (B, H, d, S)
    v = heads(f"{p}.attention.self.value", [0, 2, 1, 3])
    scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), scale), bias)
    context = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    context = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), merge)
    attended = g.op("Add", g.linear(context, weights, f"{p}.attention.output.dense"), x)
    x = g.layer_norm(attended, weights, f"{p}.attention.output.LayerNorm", eps)
    inner = g.linear(x, weights, f"{p}.intermediate.dense")
    half = g.const(f"{p}.half", np.array(0.5, np.float32))
    root2 = g.const(f"{p}.sqrt2", np.array(math.sqrt(2.0), np.float32))
    one = g.const(f"{p}.one", np.array(1.0, np.float32))
    gelu = g.op("Mul", g.op("Mul", inner, half),
                g.op("Add", g.op("Erf", g.op("Div", inner, root2)), one))
    out = g.op("Add", g.linear(gelu, weights, f"{p}.output.dense"), x)
    return g.layer_norm(out, weights, f"{p}.output.LayerNorm", eps)


def _mean_pool(g: _Graph, x: str, mask: str) -> None:
    """``sentence``: the mean of ``x`` over the unmasked tokens, scaled to unit length (as
    sentence-transformers' Pooling and Normalize modules: clamps 1e-9 and 1e-12)."""
    weights = g.op("Unsqueeze", mask, g.const("axes_2", np.array([2], np.int64)))
    one_axis = g.const("axes_1", np.array([1], np.int64))
    total = g.op("ReduceSum", g.op("Mul", x, weights), one_axis, keepdims=0)
    count = g.op("Max", g.op("ReduceSum", weights, one_axis, keepdims=0),
                 g.const("min_count", np.array(1e-9, np.float32)))
    mean = g.op("Div", total, count)
    norm = g.op("Max", g.op("ReduceL2", mean, axes=[1], keepdims=1),
                g.const("min_norm", np.array(1e-12, np.float32)))
    g.op("Div", mean, norm, out="sentence")
