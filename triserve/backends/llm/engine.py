"""The continuous-batching LLM engine: one thread that owns the model.

Every step the engine thread admits waiting requests into free slots
(reusing a cached prefix when a finished sequence shares one) and prefills
the prompt tokens of this step together in one forward pass, then runs one
decode step for all sequences whose prompt is in the cache and delivers each
sequence's new token through its callback. The prompt tokens prefilled in one
step are bounded (``max_prefill_tokens``): a long prompt, or a burst of new
requests, is prefilled in chunks over several steps, so the running sequences'
next token waits for one bounded chunk, never a whole long prompt. A sequence
leaves as soon as it finishes, so its slot is reused at the next step; a
request that arrives while others generate joins them without waiting for the
batch to drain.

All calls from other threads (``add_request``, ``abort``, ``stats``) only touch
the queue under a lock; the model, the KV cache and the prefix cache belong to
the engine thread.

Faults stay with the request that caused them: sampling answers per row (a NaN
row fails its own sequence), a prefill that fails for a batch is retried one
sequence at a time, and an exception that escapes the step loop ends every
request in flight with the error and restarts the loop (``supervision.py``).
The waiting queue is bounded (``max_queue_size``): beyond it ``add_request``
raises :class:`EngineOverloaded` at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from triserve.backends.llm.faults import FaultInjection
from triserve.backends.llm.model_runner import DTYPES, ModelRunner, PrefillChunk
from triserve.backends.llm.prefix_cache import PrefixCache
from triserve.backends.llm.quantization import CPU_KERNELS, QUANTIZATIONS
from triserve.backends.llm.sampling import SamplingParams, SamplingRow, make_generator, sample
from triserve.backends.llm.supervision import RestartPolicy
from triserve.backends.llm.weights import ModelSource

__all__ = ["EngineConfig", "EngineOverloaded", "EngineUnavailable", "LLMEngine", "SamplingParams",
           "StepOutput"]

logger = logging.getLogger("triserve.llm.engine")


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences decoded together
    max_model_len: int = 2048  # context length (prompt + generated)
    prefix_cache_bytes: int = 256 << 20  # bound of the finished sequences' KV kept for reuse
    # the running sequences' KV cache, reserved once: as many slots of max_model_len tokens as
    # fit (at most max_num_seqs); pages are backed by memory only once written
    kv_cache_bytes: int = 1024 << 20
    num_threads: int | None = None  # torch threads of the engine thread; None: all cores but one
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N (resolved by the loader from "auto")
    quantization: str = "none"  # none | int8 | int4 (weight-only; a GGUF's quantized blocks stay as stored)
    # the output head: none (as stored or as `quantization` says) | int4 (re-quantized into groups
    # of 32: the head is the largest single matrix, and int4's kernel reads it fastest)
    head_quantization: str = "none"
    # what multiplies quantized weights (quantization int4/int8, a GGUF's quantized blocks):
    # auto | vnni (triserve's kernels) | torch (torch's weight-only kernels); quantization.CPU_KERNELS
    cpu_kernels: str = "auto"
    # prompt tokens prefilled per step: a longer prompt (or a burst of them) is prefilled in
    # chunks over several steps, so the running sequences' next token waits for one bounded chunk
    max_prefill_tokens: int = 512
    # requests waiting for a slot beyond the free ones; more are refused at once.
    # None: 4 x max_num_seqs
    max_queue_size: int | None = None
    # torch.compile the batch-1 decode step at load (inductor; needs a C++ compiler; compiled
    # code is cached on disk, so later loads take seconds); a compilation that fails is logged
    # and the eager step serves
    compile: bool = False
    # on a CUDA device: capture the decode step as CUDA graphs at load (one per padded batch size)
    # and replay them; takes one more KV slot from kv_cache_bytes (the padding rows' scratch
    # slot). A capture that fails is logged and the eager step serves. Ignored on the CPU
    cuda_graphs: bool = True
    # test-only fault injection (faults.py); None: off
    fault_nan_seed: int | None = None
    fault_crash_seed: int | None = None
    fault_prefill_seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_queue_size is None:
            self.max_queue_size = 4 * self.max_num_seqs
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, got {self.max_prefill_tokens}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}'; expected one of {', '.join(DTYPES)}")
        if self.head_quantization not in ("none", "int8", "int4"):
            raise ValueError(f"unknown head_quantization '{self.head_quantization}'; expected none, int8 or int4")
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"unknown cpu_kernels '{self.cpu_kernels}'; expected one of {', '.join(CPU_KERNELS)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization '{self.quantization}'; "
                             f"expected one of {', '.join(QUANTIZATIONS)}")

    @property
    def faults(self) -> FaultInjection:
        return FaultInjection(self.fault_nan_seed, self.fault_crash_seed, self.fault_prefill_seed)

    @property
    def threads(self) -> int:
        """Leave one core to the server's event loop (a 2-core machine must stay responsive)."""
        return self.num_threads or max(1, (os.cpu_count() or 1) - 1)

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self.device.startswith("cuda")


class EngineUnavailable(RuntimeError):
    """The engine takes no requests: it is stopping, or it gave up after repeated faults."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (``max_queue_size``): the request is refused, nothing queued."""


@dataclass(slots=True)
class StepOutput:
    """One step of one request, delivered to its callback on the engine thread."""

    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    error: str | None = None  # set when the engine failed the request (finish_reason "abort")
    engine_fault: bool = False  # the error is the engine's (it restarted or stopped), not the request's
    # per new token, when the request asked for logprobs: (token, logprob, top alternatives)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


@dataclass(eq=False, slots=True)
class _Sequence:
    request_id: str
    prompt_tokens: int
    params: SamplingParams
    on_output: Callable[[StepOutput], None]
    sampling: SamplingRow  # its token_ids are the sequence's prompt + generated tokens
    slot: int = -1  # index into the engine's running list and the KV cache
    kv_length: int = 0  # positions of token_ids whose KV is in the slot
    cached_tokens: int = 0
    prefilled: bool = False  # the whole prompt is in the KV cache (it may take several steps)
    generated: int = 0
    finished: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.sampling.token_ids


@dataclass
class _Inbox:
    """What other threads hand to the engine thread (guarded by the engine's lock)."""

    waiting: deque[_Sequence] = field(default_factory=deque)
    aborts: set[str] = field(default_factory=set)
    request_ids: set[str] = field(default_factory=set)  # waiting or running
    stopping: bool = False


class LLMEngine:
    def __init__(self, model: ModelSource | torch.nn.Module, config: EngineConfig):
        """``model``: what the loader read, or a loaded HF model (its weights are then shared
        where they need no conversion)."""
        self.config = config
        source = model if isinstance(model, ModelSource) else ModelSource.from_hf_model(model)
        with torch.inference_mode():
            self.runner = ModelRunner(source.config, source.weights, config.max_model_len, config.dtype,
                                      config.quantization, config.device, config.head_quantization,
                                      config.cpu_kernels)
        self._spare_slots = 1 if config.uses_cuda_graphs else 0  # the CUDA graphs' padding rows write there
        self.max_slots = _kv_slots(config, self.runner.kv_bytes_per_token, self._spare_slots)
        self.kv_cache = self.runner.new_kv_cache(self.max_slots, self._spare_slots)
        if config.uses_cuda_graphs:
            self._capture_graphs()
        if config.compile:
            if self.runner.graphs is None:
                self._compile()
            else:  # every step torch.compile's graphs would serve replays a CUDA graph
                logger.info("compile: the decode step runs as CUDA graphs, torch.compile is skipped")
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        self._lock = threading.Condition()
        self._inbox = _Inbox()
        self._running: list[_Sequence] = []  # _running[i].slot == i
        self._thread: threading.Thread | None = None
        self._faults = config.faults
        self._restart_policy = RestartPolicy()
        self._restarting = False
        self.failure: str | None = None  # why the engine gave up (set once, on the engine thread)
        self.generated_tokens_total = 0
        self.prompt_tokens_total = 0
        self.refused_total = 0  # requests refused because the waiting queue was full

    def _compile(self) -> None:
        """Compile the batch-1 decode step now, with the engine's threads (inductor's kernels are
        generated for that many), in a thread of its own; on failure the eager step stays."""
        failure: list[BaseException] = []

        def compile_with_engine_threads() -> None:
            torch.set_num_threads(self.config.threads)
            try:
                with torch.inference_mode():
                    self.runner.compile_decode(self.kv_cache)
            except BaseException as exc:  # noqa: BLE001 - reported below, the eager step serves
                failure.append(exc)

        logger.info("compiling the decode step with torch.compile (%d thread(s); the first time takes "
                    "minutes, later loads reuse inductor's cache: TORCHINDUCTOR_CACHE_DIR, by default "
                    "/tmp/torchinductor_<user>)", self.config.threads)
        started = time.monotonic()
        thread = threading.Thread(target=compile_with_engine_threads, name="llm-compile")
        thread.start()
        thread.join()
        if failure:
            logger.warning("compiling the decode step failed (%s: %s); decoding runs uncompiled",
                           type(failure[0]).__name__, str(failure[0]).splitlines()[0] if str(failure[0]) else "")
        else:
            logger.info("decode step compiled in %.1f s", time.monotonic() - started)

    def _capture_graphs(self) -> None:
        """Capture the decode step as CUDA graphs over the current KV cache; on failure the
        eager step serves."""
        started = time.monotonic()
        try:
            with torch.inference_mode():
                self.runner.capture_decode_graphs(self.kv_cache)
        except Exception as exc:  # noqa: BLE001 - reported, the eager step serves
            logger.warning("capturing the decode step as CUDA graphs failed (%s: %s); decoding runs without "
                           "graphs (cuda_graphs: false silences this)", type(exc).__name__,
                           str(exc).splitlines()[0] if str(exc) else "")
            return
        logger.info("decode step captured as CUDA graphs for batches of %s in %.1f s",
                    ", ".join(map(str, self.runner.graphs.sizes)), time.monotonic() - started)

    # --- called from any thread -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish every request with "abort" and end the engine thread."""
        with self._lock:
            self._inbox.stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            self._drain()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    on_output: Callable[[StepOutput], None]) -> None:
        prompt = [int(token) for token in prompt_token_ids]
        self._check_prompt(prompt)
        sequence = _Sequence(request_id, len(prompt), params, on_output,
                             SamplingRow(params, make_generator(params.seed), prompt))
        with self._lock:
            if self._inbox.stopping:
                raise EngineUnavailable(self.failure or "the LLM engine is stopped")
            if request_id in self._inbox.request_ids:
                raise ValueError(f"request id '{request_id}' is already in the engine")
            self._check_room()
            self._inbox.request_ids.add(request_id)
            self._inbox.waiting.append(sequence)
            self._lock.notify()

    def _check_room(self) -> None:
        """Refuse a request the waiting queue has no room for (called under the lock)."""
        free_slots = max(0, self.max_slots - len(self._running))
        if len(self._inbox.waiting) >= free_slots + self.config.max_queue_size:
            self.refused_total += 1
            raise EngineOverloaded(
                f"{len(self._running)} sequences running and {len(self._inbox.waiting)} waiting "
                f"(max_num_seqs {self.config.max_num_seqs}, max_queue_size {self.config.max_queue_size})")

    @property
    def healthy(self) -> bool:
        """The engine thread runs and takes requests (False while it restarts after a fault)."""
        thread = self._thread
        return (thread is not None and thread.is_alive() and not self._restarting
                and self.failure is None and not self._inbox.stopping)

    def abort(self, request_id: str) -> None:
        """Finish the request with "abort" at the next step (no-op if it already finished)."""
        with self._lock:
            if request_id in self._inbox.request_ids:
                self._inbox.aborts.add(request_id)
                self._lock.notify()

    def stats(self) -> dict[str, Any]:
        running = list(self._running)
        return {
            "running": len(running),
            "waiting": len(self._inbox.waiting),
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_cache_queries": self.prefix_cache.queries,
            "prefix_cache_bytes": self.prefix_cache.bytes,
            "prefix_cache_entries": len(self.prefix_cache),
            "kv_cache_bytes_in_use": sum(s.kv_length for s in running) * self.kv_cache.bytes_per_token,
            "kv_cache_bytes_reserved": self.kv_cache.bytes_reserved,
            "weight_bytes": self.runner.weight_bytes,
            "generated_tokens_total": self.generated_tokens_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "refused_total": self.refused_total,
            "engine_restarts_total": self._restart_policy.restarts,
            "decode_graph_steps_total": self.runner.graph_steps,
        }

    def _check_prompt(self, prompt: list[int]) -> None:
        limit = self.config.max_model_len
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) >= limit:
            raise ValueError(f"the prompt has {len(prompt)} tokens, but the context length is {limit} "
                             f"(prompt and at least one generated token must fit)")
        vocab = self.runner.vocab_size
        outside = [token for token in prompt if not 0 <= token < vocab]
        if outside:
            raise ValueError(f"prompt token ids {outside[:5]} are outside the vocabulary (0..{vocab - 1})")

    # --- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        """The thread: the step loop, restarted after a fault that escapes it."""
        torch.set_num_threads(self.config.threads)
        while True:
            try:
                with torch.inference_mode():
                    self._loop()
                return
            except BaseException as exc:  # noqa: BLE001 - the thread must never die silently
                try:
                    if not self._recover(exc):
                        return
                except BaseException as second:  # noqa: BLE001 - e.g. no memory for fresh caches
                    logger.critical("LLM engine could not recover", exc_info=second)
                    with self._lock:
                        self.failure = (f"the LLM engine failed ({type(exc).__name__}: {exc}) and could "
                                        f"not restart ({type(second).__name__}: {second})")
                        self._inbox.stopping = True
                    return

    def _loop(self) -> None:
        while (work := self._next_work()) is not None:
            candidates, aborted = work
            for sequence in aborted:
                self._finish(sequence, "abort", [])
            plan = self._plan_prefill(candidates)
            if plan:
                self._faults.crash_on_admission([s.params for s, _ in plan])
                self._guarded([sequence for sequence, _ in plan], self._prefill, plan)
            decoding = [s for s in self._running if s.prefilled]
            if decoding:
                self._guarded(decoding, self._decode, decoding)
        self._drain()

    def _recover(self, exc: BaseException) -> bool:
        """After a fault escaped the loop: end every request in flight with the error, start
        over on fresh caches after a backoff; False when the engine gives up (too many faults)."""
        self._restarting = True
        logger.error("LLM engine failed", exc_info=exc)
        reason = f"{type(exc).__name__}: {exc}"
        backoff = self._restart_policy.next_backoff()
        with self._lock:
            waiting = list(self._inbox.waiting)
            self._inbox.waiting.clear()
            self._inbox.aborts.clear()
            if backoff is None:
                policy = self._restart_policy
                self.failure = (f"the LLM engine failed {policy.max_restarts + 1} times within "
                                f"{policy.window_s:g} s and stopped; last error: {reason}")
                self._inbox.stopping = True
        in_flight = list(self._running) + waiting
        self._running = []
        if backoff is None:
            logger.error("%s", self.failure)
        else:
            logger.warning("LLM engine restarts in %.1f s (%d restart(s) so far); %d request(s) in "
                           "flight are ended", backoff, self._restart_policy.restarts, len(in_flight))
        error = f"the LLM engine failed ({reason}); " + (
            "it stopped" if backoff is None else "it restarts")
        for sequence in in_flight:
            sequence.finished = True
            sequence.slot = -1
            with self._lock:
                self._inbox.request_ids.discard(sequence.request_id)
            self._deliver(sequence, StepOutput([], True, "abort", sequence.prompt_tokens,
                                               sequence.cached_tokens, error, engine_fault=True))
        # the slots' state is unknown after a fault: start over from empty caches
        self.kv_cache = self.runner.new_kv_cache(self.max_slots, self._spare_slots)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        if self.runner.graphs is not None:  # they were bound to the old cache
            self._capture_graphs()
        if backoff is None:
            return False
        time.sleep(backoff)
        self._restarting = False
        return True

    def _next_work(self) -> tuple[list[_Sequence], list[_Sequence]] | None:
        """Wait until there is something to do; take the aborted sequences and the waiting ones
        that fit the free slots. None when the engine is stopping."""
        inbox = self._inbox
        with self._lock:
            while not (inbox.stopping or inbox.waiting or inbox.aborts or self._running):
                self._lock.wait()
            if inbox.stopping:
                return None
            aborted = [s for s in self._running if s.request_id in inbox.aborts]
            aborted += [s for s in inbox.waiting if s.request_id in inbox.aborts]
            inbox.waiting = deque(s for s in inbox.waiting if s.request_id not in inbox.aborts)
            inbox.aborts.clear()
            free = self.max_slots - len(self._running) + sum(s.slot >= 0 for s in aborted)
            candidates = [inbox.waiting.popleft() for _ in range(min(free, len(inbox.waiting)))]
            return candidates, aborted

    def _guarded(self, sequences: list[_Sequence], step: Callable[..., None], *args: Any) -> None:
        """Run a model step; if it fails, fail its sequences and keep the engine serving."""
        try:
            step(*args)
        except Exception as exc:
            logger.exception("LLM engine step failed")
            for sequence in sequences:
                if not sequence.finished:
                    self._finish(sequence, "abort", [], error=f"{type(exc).__name__}: {exc}")

    # --- scheduling: chunked prefill under a per-step token budget, then one decode step ---

    def _plan_prefill(self, candidates: list[_Sequence]) -> list[tuple[_Sequence, int]]:
        """This step's prompt tokens, at most ``max_prefill_tokens``: first the next chunk of the
        prompts already being prefilled, then new candidates (given a slot each) while the budget
        lasts; the other candidates go back to the front of the queue, in order. A long prompt is
        prefilled over several steps, and the running sequences decode at every one of them."""
        budget = self.config.max_prefill_tokens
        plan: list[tuple[_Sequence, int]] = []
        for sequence in self._running:
            if not sequence.prefilled and budget > 0:
                count = min(budget, sequence.prompt_tokens - sequence.kv_length)
                plan.append((sequence, count))
                budget -= count
        for index, sequence in enumerate(candidates):
            if budget <= 0:
                with self._lock:
                    self._inbox.waiting.extendleft(reversed(candidates[index:]))
                break
            self._guarded([sequence], self._take_slot, sequence)
            if not sequence.finished:
                count = min(budget, sequence.prompt_tokens - sequence.kv_length)
                plan.append((sequence, count))
                budget -= count
        return plan

    def _take_slot(self, sequence: _Sequence) -> None:
        """Join the running sequences, with the KV of the longest cached prefix of the prompt."""
        prompt = sequence.token_ids
        slot = len(self._running)
        if self.config.prefix_cache_bytes:
            match = self.prefix_cache.lookup(prompt, len(prompt) - 1)
            if match is not None:
                self.kv_cache.load(slot, match.kv, match.length)
                sequence.cached_tokens = sequence.kv_length = match.length
        sequence.slot = slot
        self._running.append(sequence)

    def _prefill(self, plan: list[tuple[_Sequence, int]]) -> None:
        """One forward pass over every planned chunk; a sequence whose prompt is now complete
        gets its first token."""
        try:
            if self._faults.enabled:
                self._faults.fail_prefill([s.params for s, _ in plan])
            chunks = [PrefillChunk(s.slot, s.token_ids[s.kv_length : s.kv_length + count], s.kv_length)
                      for s, count in plan]
            logits = self.runner.prefill(self.kv_cache, chunks)
        except Exception:
            if len(plan) == 1:
                raise
            # find the sequence that fails: each on its own (a prefill rewrites the same KV
            # positions, so the retry is exact); one that fails alone fails alone
            logger.exception("LLM engine: a prefill of %d sequences failed; retrying one by one", len(plan))
            for sequence, count in plan:
                self._guarded([sequence], self._prefill, [(sequence, count)])
            return
        complete = []
        for row, (sequence, count) in enumerate(plan):
            sequence.kv_length += count
            if sequence.kv_length == sequence.prompt_tokens:
                complete.append(row)
                sequence.prefilled = True
                self.prompt_tokens_total += sequence.prompt_tokens
        if complete:
            self._sample_and_advance([plan[row][0] for row in complete], logits[complete])

    def _sample_and_advance(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Each sequence's next token; a row that cannot be sampled fails only its sequence."""
        for sequence, token in zip(sequences, sample(logits, [s.sampling for s in sequences])):
            if isinstance(token, Exception):
                logger.error("request '%s': sampling failed: %s: %s", sequence.request_id,
                             type(token).__name__, token)
                self._finish(sequence, "abort", [], error=f"sampling failed: {type(token).__name__}: {token}")
            else:
                self._advance(sequence, token)

    def _decode(self, batch: list[_Sequence]) -> None:
        positions = [s.kv_length for s in batch]
        # a seeded sequence is reproducible only on the eager steps: whether it runs a step alone
        # (where the compiled step would take it) depends on when its neighbours come and go
        logits = self.runner.decode(self.kv_cache, [s.token_ids[-1] for s in batch], positions,
                                    [s.slot for s in batch],
                                    compiled=all(s.params.seed is None for s in batch))
        for sequence in batch:
            sequence.kv_length += 1
        if self._faults.enabled:
            self._faults.poison_logits(logits, [s.params for s in batch])
        self._sample_and_advance(batch, logits)

    def _advance(self, sequence: _Sequence, token: int) -> None:
        """Take one sampled token: deliver it, or finish the sequence."""
        if token in sequence.params.stop_token_ids:
            self._finish(sequence, "stop", [])
            return
        sequence.token_ids.append(token)
        sequence.generated += 1
        self.generated_tokens_total += 1
        logprobs = None if sequence.params.logprobs is None else [sequence.sampling.last_logprobs]
        if (sequence.generated >= sequence.params.max_new_tokens
                or len(sequence.token_ids) >= self.config.max_model_len):
            self._finish(sequence, "length", [token], logprobs=logprobs)
        else:
            self._deliver(sequence, StepOutput([token], False, None, sequence.prompt_tokens,
                                               sequence.cached_tokens, logprobs=logprobs))

    def _finish(self, sequence: _Sequence, reason: str, tokens: list[int], error: str | None = None,
                keep_kv: bool = True, logprobs: list | None = None) -> None:
        sequence.finished = True
        if sequence.slot >= 0:
            self._release(sequence, keep_kv=keep_kv and error is None)
        with self._lock:
            self._inbox.request_ids.discard(sequence.request_id)
        self._deliver(sequence, StepOutput(tokens, True, reason, sequence.prompt_tokens,
                                           sequence.cached_tokens, error, logprobs=logprobs))

    def _release(self, sequence: _Sequence, keep_kv: bool) -> None:
        """Free the sequence's slot (the last running sequence moves into it), keeping its KV
        in the prefix cache for a later turn of the same conversation."""
        slot = sequence.slot
        if keep_kv and self.config.prefix_cache_bytes and sequence.kv_length:
            self.prefix_cache.insert(sequence.token_ids[: sequence.kv_length],
                                     self.kv_cache.export(slot, sequence.kv_length))
        last = self._running.pop()
        if last is not sequence:
            self.kv_cache.move(last.slot, slot, last.kv_length)
            last.slot = slot
            self._running[slot] = last
        sequence.slot = -1

    def _deliver(self, sequence: _Sequence, output: StepOutput) -> None:
        try:
            sequence.on_output(output)
        except Exception:
            logger.exception("output callback of request '%s' failed", sequence.request_id)

    def _drain(self) -> None:
        """Abort everything still queued or running (the engine is stopping, so no KV is kept)."""
        with self._lock:
            waiting = list(self._inbox.waiting)
            self._inbox.waiting.clear()
        for sequence in list(self._running) + waiting:
            self._finish(sequence, "abort", [], keep_kv=False)


def _kv_slots(config: EngineConfig, bytes_per_token: int, spare_slots: int = 0) -> int:
    """Sequences of ``max_model_len`` tokens whose KV fits ``kv_cache_bytes`` beside
    ``spare_slots`` more (at most ``max_num_seqs``); refuses a budget too small for even one."""
    per_sequence = config.max_model_len * bytes_per_token
    slots = min(config.max_num_seqs, config.kv_cache_bytes // per_sequence - spare_slots)
    if slots < 1:
        spare = (f" beside the CUDA graphs' scratch slot (cuda_graphs: false frees it)" if spare_slots else "")
        raise ValueError(f"the KV cache budget ({config.kv_cache_bytes >> 20} MB) does not hold one sequence of "
                         f"max_model_len {config.max_model_len} tokens ({-(-per_sequence >> 20)} MB){spare}; "
                         f"raise kv_cache_mb or lower max_model_len")
    if slots < config.max_num_seqs:
        logger.warning("the KV cache budget (%d MB) holds %d sequences of %d tokens: %d run at once, not "
                       "max_num_seqs %d (raise kv_cache_mb for more)", config.kv_cache_bytes >> 20, slots,
                       config.max_model_len, slots, config.max_num_seqs)
    return slots
