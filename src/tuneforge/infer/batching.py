"""Step-level continuous batching for the Hugging Face backend: one thread runs the model for every request.

Requests join the running batch between two decoding steps: a new request is read once (its prompt, alone, so that
its first token is exactly what `generate` would pick) and its key/value cache is appended to the batch's, left
padded as `generate` pads a batch; each step then decodes one token for every active request at once. A finished,
stopped or cancelled request leaves the batch at the next step, freeing its slot. The waiting line is bounded:
`submit` refuses with `QueueFull` instead of growing without limit.

Each request samples with its own settings (temperature, top-p, top-k, penalties) and its own random generator
(`seed`), so answers do not depend on which other requests share the batch. Models without a key/value cache
(Mixture-of-Depths runs) are decoded one request at a time over the whole sequence.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import queue
import threading
from dataclasses import dataclass, field

import torch

from tuneforge.model.depth import CONFIG_KEY as MIXTURE_OF_DEPTHS


class QueueFull(Exception):
    """The waiting line is full; the caller should retry later."""


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ("token", id) ... ("done", reason)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    _listener: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, event: tuple) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener(event)
            else:
                self.events.put(event)

    def listen(self, callback) -> None:
        """Deliver events to `callback` (from the batcher's thread) instead of the queue, past ones first."""
        with self._lock:
            while not self.events.empty():
                callback(self.events.get())
            self._listener = callback

    def cancel(self) -> None:
        """Leave the batch at the next step (client gone, stop string seen)."""
        self.cancelled.set()


class _Line:
    """The callers' side of a batcher: a bounded line of waiting requests (all of n answers, or none, get a place)
    and a generation thread that takes them from it. Subclasses say how many run (`active`) and run them."""

    def __init__(self, max_batch: int, max_queue: int, name: str):
        self.max_batch, self.max_queue = max(1, max_batch), max(0, max_queue)
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: list[int], sampling: Sampling, stop_ids) -> Request:
        return self.submit_many([prompt], [sampling], stop_ids)[0]

    def submit_many(self, prompts: list[list[int]], samplings: list[Sampling], stop_ids) -> list[Request]:
        with self._wake:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(prompts) > self.max_queue + self.max_batch - self.active - len(self._waiting):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            requests = [Request(list(p), s, frozenset(stop_ids)) for p, s in zip(prompts, samplings)]
            self._waiting.extend(requests)
            self._wake.notify()
        return requests

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        raise NotImplementedError


class Batcher(_Line):
    def __init__(self, model, pad_token_id: int | None, max_batch: int = 8, max_queue: int = 64):
        super().__init__(max_batch, max_queue, "tuneforge-batcher")
        self.model = model
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.cached = not getattr(model.config, MIXTURE_OF_DEPTHS, None)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version's forward takes
        self._cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.steps = 0  # decoding steps run (for tests and statistics)
        self._thread.start()

    @property
    def active(self) -> int:
        """Requests being decoded now."""
        return len(getattr(self, "_active_rows", []))

    # --- the model's side ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        self._active_rows: list[_Row] = []
        self._cache = None  # per layer (keys, values) of the active rows, left padded: (B, heads, L, dim)
        self._mask = None  # (B, L): 1 where a row has a real token
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active_rows:
                    self._wake.wait()
                if self._closed:
                    for row in self._active_rows:
                        row.finish("cancelled")
                    while self._waiting:
                        self._waiting.popleft().put(("done", "cancelled"))
                    return
                joining = []
                while self._waiting and len(self._active_rows) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
            try:
                with torch.inference_mode():
                    for request in joining:
                        if request.cancelled.is_set():
                            request.put(("done", "cancelled"))
                            continue
                        try:
                            self._admit(request)
                        except Exception as error:  # e.g. out of memory on a long prompt: only this one fails
                            request.put(("error", f"{type(error).__name__}: {error}"))
                    self._drop_finished()
                    if self._active_rows:
                        self._step()
                        self._drop_finished()
            except Exception as error:  # a failing step ends its requests with the error; the server stays up
                for row in self._active_rows:
                    row.request.put(("error", f"{type(error).__name__}: {error}"))
                self._active_rows, self._cache, self._mask = [], None, None

    def _admit(self, request: Request) -> None:
        row = _Row(request, self.model.device)
        ids = torch.tensor([request.prompt], device=self.model.device)
        if not self.cached:
            row.emit(self._pick(row, self.model(input_ids=ids).logits[0, -1]))
            self._active_rows.append(row)
            return
        from transformers import DynamicCache

        cache = DynamicCache()  # full layers (sliding-window models included: their masks keep the window)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{self._cache_arg: cache})
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        mask = torch.ones(1, ids.shape[1], dtype=torch.long, device=ids.device)
        if self._active_rows:
            width = max(self._mask.shape[1], mask.shape[1])
            layers = [(torch.cat([_pad_left(k0, width), _pad_left(k1, width)]),
                       torch.cat([_pad_left(v0, width), _pad_left(v1, width)]))
                      for (k0, v0), (k1, v1) in zip(self._cache, layers)]
            mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        self._cache, self._mask = layers, mask
        self._active_rows.append(row)
        row.emit(self._pick(row, out.logits[0, -1]))
        self.largest_batch = max(self.largest_batch, len(self._active_rows))

    def _step(self) -> None:
        rows = self._active_rows
        self.steps += 1
        if not self.cached:
            for row in rows:
                ids = torch.tensor([row.request.prompt + row.request.tokens], device=self.model.device)
                row.emit(self._pick(row, self.model(input_ids=ids).logits[0, -1]))
            return
        from transformers import DynamicCache

        device = self.model.device
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self._cache):
            cache.update(keys, values, index)
        length = self._mask.shape[1]
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=device)], dim=1)
        positions = self._mask.sum(dim=1, keepdim=True)
        ids = torch.tensor([[row.request.tokens[-1]] for row in rows], device=device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         cache_position=torch.tensor([length], device=device), **{self._cache_arg: cache})
        self._cache = [(layer.keys, layer.values) for layer in cache.layers]
        self._mask = mask
        logits = out.logits[:, -1]
        for index, row in enumerate(rows):
            row.emit(self._pick(row, logits[index]))

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._active_rows) if not row.finished()]
        if len(keep) == len(self._active_rows):
            return
        self._active_rows = [self._active_rows[i] for i in keep]
        if not self.cached:
            return
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(dim=0) > 0).nonzero()[0])  # columns that are padding for every remaining row go
        self._mask = mask[:, start:]
        self._cache = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                       for k, v in self._cache]

    def _pick(self, row: "_Row", logits: torch.Tensor) -> int:
        s, request = row.request.sampling, row.request
        logits = logits.float()
        if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
            logits = logits.clone()
            seen = torch.tensor(request.prompt + request.tokens, device=logits.device)
            if s.repetition_penalty != 1.0:  # as transformers' RepetitionPenaltyLogitsProcessor
                chosen = logits[seen]
                logits[seen] = torch.where(chosen < 0, chosen * s.repetition_penalty, chosen / s.repetition_penalty)
            if request.tokens and (s.presence_penalty or s.frequency_penalty):  # as OpenAI: generated tokens only
                ids, counts = torch.tensor(request.tokens, device=logits.device).unique(return_counts=True)
                logits[ids] -= s.presence_penalty + s.frequency_penalty * counts.to(logits.dtype)
        if s.temperature <= 0:
            return int(logits.argmax())
        logits = logits / s.temperature
        if s.top_k:
            floor = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < floor, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > s.top_p  # keep the smallest set reaching top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))


class _Row:
    _seeds = itertools.count()

    def __init__(self, request: Request, device):
        self.request = request
        self.generator = torch.Generator(device=device)
        seed = request.sampling.seed
        self.generator.manual_seed(seed if seed is not None else torch.seed() + next(self._seeds))
        self._done = False

    def emit(self, token: int) -> None:
        request = self.request
        if request.cancelled.is_set():
            return self.finish("cancelled")
        if token in request.stop_ids:
            return self.finish("stop")
        request.tokens.append(token)
        request.put(("token", token))
        if len(request.tokens) >= request.sampling.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self.request.finish_reason = reason
            self.request.put(("done", reason))

    def finished(self) -> bool:
        if not self._done and self.request.cancelled.is_set():
            self.finish("cancelled")
        return self._done


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (-2 for keys/values, -1 for a mask) up to `width`."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


class GroupBatcher(_Line):
    """The same interface for engines that batch internally (vLLM): waiting requests are handed over in groups of
    up to `max_batch`; each request's tokens are delivered when its group is done."""

    def __init__(self, run_group, max_batch: int = 8, max_queue: int = 64):
        super().__init__(max_batch, max_queue, "tuneforge-group-batcher")
        self.run_group = run_group  # list[Request] -> list[(token ids, finish reason)]
        self._running: list[Request] = []
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._running)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting:
                    self._wake.wait()
                if self._closed:
                    while self._waiting:
                        self._waiting.popleft().put(("done", "cancelled"))
                    return
                group = []
                while self._waiting and len(group) < self.max_batch:
                    request = self._waiting.popleft()
                    if request.cancelled.is_set():
                        request.put(("done", "cancelled"))
                    else:
                        group.append(request)
                self._running = group
            if not group:
                continue
            self.largest_batch = max(self.largest_batch, len(group))
            try:
                results = self.run_group(group)
            except Exception as error:
                for request in group:
                    request.put(("error", f"{type(error).__name__}: {error}"))
                results = []
            for request, (tokens, reason) in zip(group, results):
                for token in tokens[: request.sampling.max_new_tokens]:
                    if token in request.stop_ids:
                        reason = "stop"
                        break
                    request.tokens.append(token)
                    request.put(("token", token))
                request.finish_reason = "cancelled" if request.cancelled.is_set() else reason
                request.put(("done", request.finish_reason))
            self._running = []
