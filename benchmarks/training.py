"""Training loops of ``promptcache fit``, on the CPU with torch (imported when called).

- :func:`train_cross_encoder`: the bundled MiniLM fine-tuned as a pair classifier;
- :func:`train_embedder`: the embedder's top transformer layers fine-tuned with CoSENT.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptcache.benchmarks.pairs import Lookups, Pair, normalise
from promptcache.cache.errors import ConfigError


def _log(message: str) -> None:
    print(f"fit: {message}", file=sys.stderr, flush=True)


def train_cross_encoder(pairs: Sequence[Pair], lookups: Lookups, out: Path, *,
                         budget: float, max_length: int, batch: int = 32, seed: int = 0
                         ) -> None:
    """Fine-tune the bundled MiniLM as a pair classifier for ``budget`` seconds."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from promptcache.cache.semantic.embedding import default_model_path

    hf_logging.set_verbosity_error()  # "newly initialised classifier" is the point here
    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples = [(p.a, p.b, float(p.label)) for p in pairs if normalise(p.a) != normalise(p.b)]
    examples += [(q, c, 0.0) for q, c, own in zip(lookups.query, lookups.candidate,
                                                  lookups.own, strict=True) if not own]
    base = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
                                                               local_files_only=True)
    model.bert.embeddings.requires_grad_(False)  # word embeddings: most weights, least gain
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=4e-5, weight_decay=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    start, step, seen, per_step = time.perf_counter(), 0, 0, 0.0
    while time.perf_counter() - start < budget:
        rng.shuffle(examples)
        for i in range(0, len(examples), batch):
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            left = budget - elapsed  # linear decay to the end of the budget
            per_step = elapsed / step if step else 1.0
            for group in opt.param_groups:
                group["lr"] = 4e-5 * min(1.0, (step + 1) / 100) * min(1.0, left / (
                    0.5 * budget)) + 1e-7
            chunk = [(b, a, y) if rng.random() < 0.5 else (a, b, y)
                     for a, b, y in examples[i:i + batch]]
            enc = tokenizer([a for a, _, _ in chunk], [b for _, b, _ in chunk],
                            truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            loss = loss_fn(model(**enc).logits[:, 0], torch.tensor([y for *_, y in chunk]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad()
            step, seen = step + 1, seen + len(chunk)
            if step % 100 == 0:
                _log(f"step {step}, {seen} pairs, {elapsed:.0f}s, loss {loss.item():.3f}")
    _log(f"trained {step} steps on {seen} pairs in {time.perf_counter() - start:.0f}s "
         f"({per_step:.2f}s per step)")
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def train_embedder(pairs: Sequence[Pair], lookups: Lookups, out: Path, *, budget: float,
                   layers: int, lr: float = 5e-5, batch: int = 64, max_length: int = 64,
                   seed: int = 0, base: str | Path | None = None) -> dict[str, str]:
    """Fine-tune the top ``layers`` transformer layers of the embedder for ``budget`` seconds.

    The loss is CoSENT (every label-1 pair of a batch should score a higher cosine than every
    label-0 pair), over the training pairs plus the lookups' wrong nearest neighbours as
    extra negatives: exactly the ordering a similarity threshold needs. Only the tuned
    layers are written (a few MB of safetensors), and loaded on top of the base model.
    """
    import torch
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer

    from promptcache.cache.semantic.embedding import default_model_path

    rng = random.Random(seed)
    torch.manual_seed(seed)
    base_path = Path(base) if base else default_model_path()
    model = SentenceTransformer(str(base_path), device="cpu", local_files_only=True)
    model.max_seq_length = max_length
    encoder: Any = model[0].auto_model
    stack = encoder.encoder.layer
    if not 0 < layers <= len(stack):
        raise ConfigError(f"--tune-layers must be 1..{len(stack)}")
    model.requires_grad_(False)
    tuned = [f"encoder.layer.{i}." for i in range(len(stack) - layers, len(stack))]
    trainable = [p for n, p in encoder.named_parameters() if n.startswith(tuple(tuned))]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    examples = [(p.a, p.b, p.label) for p in pairs if normalise(p.a) != normalise(p.b)]
    examples += [(q, c, 0) for q, c, own in zip(lookups.query, lookups.candidate, lookups.own,
                                                strict=True) if not own]

    def embed(texts: list[str]) -> torch.Tensor:
        features = model.tokenize(texts)
        return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)

    model.train()
    start, step, seen = time.perf_counter(), 0, 0
    while time.perf_counter() - start < budget:
        rng.shuffle(examples)
        for i in range(0, len(examples) - batch + 1, batch):
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            for group in opt.param_groups:  # warm up, then decay to the end of the budget
                group["lr"] = lr * min(1.0, (step + 1) / 50) * min(
                    1.0, (budget - elapsed) / (0.5 * budget)) + 1e-7
            chunk = examples[i:i + batch]
            cos = (embed([a for a, _, _ in chunk]) * embed([b for _, b, _ in chunk])).sum(-1)
            label = torch.tensor([y for *_, y in chunk])
            gap = (cos[None, :] - cos[:, None]) * 20.0  # gap[i, j] = cos_j - cos_i
            loss = torch.logsumexp(torch.cat([torch.zeros(1),
                                              gap[label[:, None] > label[None, :]]]), 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(chunk)
            if step % 50 == 0:
                _log(f"step {step}, {seen} pairs, {elapsed:.0f}s, loss {loss.item():.3f}")
    _log(f"trained {step} steps on {seen} pairs in {time.perf_counter() - start:.0f}s")
    state = {n: p.detach().to(torch.float16).contiguous()
             for n, p in encoder.named_parameters() if n.startswith(tuple(tuned))}
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    meta = {"kind": "promptcache-embedder-tuning", "base": base_path.name,
            "layers": ",".join(t.split(".")[2] for t in tuned),
            "fingerprint": digest.hexdigest()[:12], "steps": str(step), "pairs": str(seen)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    return meta
