"""Training data for the recipes: text and JSONL sources, SFT loss masks, token-budget batches balanced over ranks.

Sources: a text file (documents separated by blank lines), a folder of `.txt` / `.jsonl` files (sorted), or a
JSONL file whose rows are `{"text": ...}` (pretraining: loss on every token), `{"prompt": ..., "response": ...}`
or chat `{"messages": [{"role": ..., "content": ...}, ...]}` (SFT: loss on the response / assistant tokens
only, the chat rendered by the tokenizer's own template). Files are read line by line, so a file larger than
memory streams; a shuffle buffer seeded per epoch makes the order deterministic for a seed, and a stream can
be fast-forwarded to a saved position (`Examples.skip`). Every bad record is a ValueError naming file and line.

A step's examples go to the data-parallel ranks longest-first to the rank with the fewest tokens, so no rank
waits on a long one, and each rank packs its share first-fit into micro-batches of at most a token budget.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

from dtllama.ops import IGNORE_INDEX
from dtllama.ops.packing import first_fit


@dataclass
class Example:
    """Token ids and, per token, whether the loss is taken on predicting it."""

    ids: list[int]
    loss_mask: list[bool]
    where: str  # file:line, for error messages

    def labels(self) -> list[int]:
        """Next-token labels: `labels[t] = ids[t + 1]` where that token is trained, else IGNORE_INDEX."""
        return [i if m else IGNORE_INDEX for i, m in zip(self.ids[1:], self.loss_mask[1:])] + [IGNORE_INDEX]

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])


def source_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.endswith((".txt", ".jsonl")))
        if not files:
            raise ValueError(f"data folder {path!r} holds no .txt or .jsonl files")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    return [path]


def records(path: str) -> Iterator[tuple[str, dict]]:
    """`(file:line, record)` of every source file, streamed; raises on an empty source."""
    found = False
    for file in source_files(path):
        reader = _jsonl_records if file.endswith(".jsonl") else _text_records
        for item in reader(file):
            found = True
            yield item
    if not found:
        raise ValueError(f"no training records in {path!r}; a text file separates documents by blank lines, a "
                         ".jsonl file holds one JSON object per line")


def _jsonl_records(file: str) -> Iterator[tuple[str, dict]]:
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{n}: not JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}:{n}: a JSONL row must be a JSON object, got {type(row).__name__}")
            yield f"{file}:{n}", row


def _text_records(file: str) -> Iterator[tuple[str, dict]]:
    with open(file, encoding="utf-8") as f:
        lines, start = [], 0
        for n, line in enumerate(f, 1):
            if line.strip():
                start = start or n
                lines.append(line)
            elif lines:
                yield f"{file}:{start}", {"text": "".join(lines).strip()}
                lines, start = [], 0
        if lines:
            yield f"{file}:{start}", {"text": "".join(lines).strip()}


def tokenize(record: dict, where: str, tokenizer) -> Example:
    """One record as an Example: pretraining text, prompt + response, or chat messages."""
    eos = tokenizer.eos_token_id
    if "text" in record:
        ids = _encode(tokenizer, record["text"], where, "text") + [eos]
        return Example(ids, [True] * len(ids), where)
    if "prompt" in record and "response" in record:
        prompt = _encode(tokenizer, record["prompt"], where, "prompt")
        response = _encode(tokenizer, record["response"], where, "response") + [eos]
        return Example(prompt + response, [False] * len(prompt) + [True] * len(response), where)
    if "messages" in record:
        return _chat(record["messages"], where, tokenizer)
    raise ValueError(f"{where}: a row needs 'text', 'prompt' and 'response', or 'messages'; it has "
                     f"{sorted(record)}")


def _encode(tokenizer, text, where: str, field: str) -> list[int]:
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    return list(tokenizer.encode(text, add_special_tokens=False) if hasattr(tokenizer, "apply_chat_template")
                else tokenizer.encode(text))


def _chat(messages, where: str, tokenizer) -> Example:
    """The template's rendering of the chat; the loss covers each assistant turn (its tokens after the template's
    generation prompt, up to where the next turn's prefix starts)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                  for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
    if not hasattr(tokenizer, "apply_chat_template") or tokenizer.chat_template is None:
        raise ValueError(f"{where}: chat rows need a tokenizer with a chat template (train from a checkpoint "
                         "that ships one, or use prompt/response rows)")

    def render(msgs, prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    ids = render(messages, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(render(messages[:i], True)), len(render(messages[:i + 1], False))
            if ids[:end] != render(messages[:i + 1], False):
                raise ValueError(f"{where}: the chat template does not render turns as prefixes of the chat, so "
                                 "the assistant tokens cannot be found; use prompt/response rows")
            mask[start:end] = [True] * (end - start)
    return Example(ids, mask, where)


class Examples:
    """Endless, shuffled, tokenized examples of a source: epoch after epoch, each order from `seed + epoch`
    through a shuffle buffer of `buffer` examples. `position` counts the examples handed out (save it with a
    checkpoint and `skip` to it on resume)."""

    def __init__(self, path: str, tokenizer, max_len: int, vocab_size: int, seed: int = 0, truncate: bool = False,
                 buffer: int = 10_000):
        self.path, self.tokenizer, self.max_len, self.vocab_size = path, tokenizer, max_len, vocab_size
        self.seed, self.truncate, self.buffer = seed, truncate, buffer
        source_files(path)  # a missing source fails now, not at the first step
        self.position = 0
        self._it = self._stream()
        self._pending: Example | None = None

    def _checked(self, ex: Example) -> Example:
        if len(ex.ids) > self.max_len:
            if not self.truncate:
                raise ValueError(f"{ex.where}: {len(ex.ids)} tokens exceed --max-seq-len {self.max_len}; raise it, or "
                                 "pass --truncate to cut such sequences")
            ex = Example(ex.ids[:self.max_len], ex.loss_mask[:self.max_len], ex.where)
        top = max(ex.ids)
        if top >= self.vocab_size:
            raise ValueError(f"{ex.where}: token id {top} is outside the model's vocabulary of {self.vocab_size}; the "
                             "tokenizer does not belong to this model")
        return ex

    def _stream(self) -> Iterator[Example]:
        epoch = 0
        while True:
            rng = random.Random(self.seed + epoch)
            pool: list[Example] = []
            for where, record in records(self.path):
                pool.append(self._checked(tokenize(record, where, self.tokenizer)))
                if len(pool) >= self.buffer:
                    yield pool.pop(rng.randrange(len(pool)))
            rng.shuffle(pool)
            yield from pool
            epoch += 1

    def __iter__(self):
        return self

    def __next__(self) -> Example:
        ex, self._pending = (self._pending, None) if self._pending is not None else (next(self._it), None)
        self.position += 1
        return ex

    def put_back(self, ex: Example) -> None:
        """Return the last example taken (it did not fit this step): the next `next` hands it out again."""
        self._pending = ex
        self.position -= 1

    def skip(self, n: int) -> None:
        """Fast-forward to position `n` (the examples a resumed run already trained on)."""
        while self.position < n:
            next(self)


def global_batch(examples: Examples, batch_tokens: int) -> list[Example]:
    """The next step's examples: at least one, then as many as keep the total within `batch_tokens`."""
    batch = [next(examples)]
    total = len(batch[0].ids)
    while True:
        ex = next(examples)
        if total + len(ex.ids) > batch_tokens:
            examples.put_back(ex)
            return batch
        batch.append(ex)
        total += len(ex.ids)


def balance(batch: list[Example], n_ranks: int) -> list[list[Example]]:
    """Examples dealt to ranks longest first, each to the rank with the fewest tokens so far (LPT): the ranks'
    token counts differ by at most the longest example. Deterministic, so every rank computes the same split."""
    shares: list[list[Example]] = [[] for _ in range(n_ranks)]
    load = [0] * n_ranks
    for ex in sorted(batch, key=lambda e: -len(e.ids)):
        r = min(range(n_ranks), key=lambda k: (load[k], k))
        shares[r].append(ex)
        load[r] += len(ex.ids)
    return shares


def microbatches(share: list[Example], max_tokens: int) -> list[list[Example]]:
    """A rank's examples packed first-fit (longest first) into micro-batches of at most `max_tokens` tokens."""
    for ex in share:
        if len(ex.ids) > max_tokens:
            raise ValueError(f"{ex.where}: {len(ex.ids)} tokens exceed --max-tokens-per-microbatch {max_tokens}; "
                             "raise it, or pass --truncate with a --max-seq-len within it")
    return [[share[i] for i in b] for b in first_fit([len(ex.ids) for ex in share], max_tokens)]
