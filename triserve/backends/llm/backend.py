"""The ``llm`` backend: a chat model served from its config alone.

A config names a model (``parameters { key: "model" ... }``); auto-complete
declares the chat contract's tensors and makes the model decoupled. Every
request is rendered with the tokenizer's own chat template (and its grammar, if
it asks for JSON, a grammar or a tool call, compiled), then handed to the
continuous-batching :class:`LLMEngine` at once: the engine, not the core's
scheduler, decides what runs together. ``capacity`` is what the engine holds
(``max_num_seqs`` running + ``max_queue_size`` waiting); a request beyond it is
refused at once with :class:`QueueFullError` (UNAVAILABLE), never queued
without bound. Sampling values a request leaves unset come from the model's
``generation_config``, else OpenAI's defaults. Engine outputs arrive on the
engine thread and are turned into responses on the event loop; a fault in one
request's reply (detokenizing) ends that request alone.

The event loop does no text work: rendering the chat template, compiling a
grammar, tokenizing and detokenizing run on the backend's one text worker thread
(one thread, so each reply's pieces stay in order), and a long prompt never
delays a health check or another stream's next piece.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tritonclient.grpc import model_config_pb2

from triserve.core.backend import Backend, Job, ModelContext
from triserve.backends.llm.chat import (
    OPENAI_SAMPLING_DEFAULTS, ChatRequest, parse_chat_request, render_prompt, stop_token_ids,
)
from triserve.backends.llm.guided import Constraint, GrammarCompiler, Guide
from triserve.backends.llm.tools import ToolCallReader, call_grammar
from triserve.core.chat_contract import (
    CHAT_INPUTS, CHAT_OUTPUTS, GRAMMAR, HISTORY, JSON_SCHEMA, LOGPROBS, REQUIRED_INPUTS, RESPONSE,
    TOOL_CHOICE, TOOL_CALLS,
)
from triserve.backends.llm.detokenize import ReplyText
from triserve.backends.llm.engine import (EngineOverloaded, EngineUnavailable, LLMEngine, SamplingParams,
                                          StepOutput)
from triserve.backends.llm.loader import LLMSettings, load_model
from triserve.backends.llm.metrics import LLMMetrics
from triserve.core.config import ConfigError
from triserve.core.errors import ErrorCode, InferError, QueueFullError
from triserve.core.types import InferResponse, InferTensor

logger = logging.getLogger("triserve.llm")


class LLMBackend(Backend):
    unary_when_decoupled = True
    numeric_for_string_inputs = True

    def __init__(self, context: ModelContext):
        super().__init__(context)
        self._engine: LLMEngine | None = None
        self._tokenizer: Any = None
        self._stop_token_ids: frozenset[int] = frozenset()
        self._metrics: LLMMetrics | None = None
        self._request_ids = itertools.count()
        self._grammars: GrammarCompiler | None = None
        self._sampling_defaults: dict[str, Any] = {}
        self._token_bytes: dict[int, bytes] = {}
        self._text_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-text")

    @classmethod
    def auto_complete_config(
        cls, config: model_config_pb2.ModelConfig, model_dir: Path
    ) -> model_config_pb2.ModelConfig:
        """Declare the chat contract's tensors the config leaves out; decoupled, no batch dimension."""
        for kind, declared, names in (("input", config.input, CHAT_INPUTS),
                                      ("output", config.output, CHAT_OUTPUTS)):
            present = {tensor.name for tensor in declared}
            unknown = sorted(present - set(names))
            if unknown:
                raise ConfigError(
                    f"{kind}(s) {', '.join(unknown)} of model '{config.name}' are not part of the "
                    f"chat contract; the llm backend's {kind}s are {', '.join(names)}")
            for name in names:
                if name not in present:
                    tensor = declared.add(name=name, data_type=model_config_pb2.TYPE_STRING, dims=[-1])
                    if kind == "input":
                        tensor.optional = name not in REQUIRED_INPUTS
        if config.max_batch_size > 0:
            raise ConfigError(f"model '{config.name}': max_batch_size must be 0 for the llm backend "
                              "(the engine batches requests itself)")
        config.model_transaction_policy.decoupled = True
        return config

    async def load(self) -> None:
        context = self.context
        settings = LLMSettings.from_config(context.config, context.model_dir)
        # loading runs torch operations on a thread of its own that then ends, and its OpenMP
        # threads with it: an OpenMP team left on a long-lived thread beside the engine thread's
        # makes every parallel region of the engine wait for sleeping threads to wake (measured:
        # a 2-thread decode step slower than a 1-thread one)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-load") as loader:
            loop = asyncio.get_running_loop()
            model, self._tokenizer = await loop.run_in_executor(loader, load_model, settings, context.logger)
            self._stop_token_ids = stop_token_ids(self._tokenizer, model.generation_config)
            self._sampling_defaults = generation_defaults(model.generation_config)
            self._engine = await loop.run_in_executor(loader, LLMEngine, model, settings.engine)
            self._grammars = await loop.run_in_executor(loader, GrammarCompiler, self._tokenizer,
                                                        self._engine.runner.vocab_size)
            del model  # the engine holds the weights it runs; nothing else keeps a copy
        _return_freed_memory()  # loading's per-tensor temporaries, back to the OS
        self._engine.start()
        if settings.engine.faults.enabled:
            context.logger.warning("model '%s': fault injection is ON (%s): for tests only",
                                   context.name, settings.engine.faults)
        self._metrics = LLMMetrics(context.name, context.version, self._engine.stats)
        engine = settings.engine
        context.logger.info("model '%s': %s, %d MB of weights (%s; quantization %s), KV cache %d MB reserved, "
                            "%d engine threads, context %d tokens, %d sequences at once, %d more may wait, "
                            "stop tokens %s, sampling defaults %s",
                            context.name, self._engine.runner.architecture, self._engine.runner.weight_bytes >> 20,
                            engine.dtype, engine.quantization, self._engine.kv_cache.bytes_reserved >> 20,
                            engine.threads, engine.max_model_len, self._engine.max_slots, engine.max_queue_size,
                            sorted(self._stop_token_ids), {**OPENAI_SAMPLING_DEFAULTS, **self._sampling_defaults})

    async def unload(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._engine is not None:
            # stop() joins the engine thread, whose last outputs are handled on this loop.
            await asyncio.to_thread(self._engine.stop)
        # the engine's last outputs are detokenized, then handled on this loop
        await asyncio.to_thread(self._text_worker.shutdown, True)

    @property
    def capacity(self) -> int:
        """Requests the engine holds: running sequences and the bounded waiting queue."""
        if self._engine is None:
            return 0  # not loaded: nothing runs
        config = self._engine.config
        return config.max_num_seqs + config.max_queue_size

    def refusal_when_full(self) -> InferError:
        return self._overloaded(f"{self.capacity} requests in flight (max_num_seqs "
                                f"{self._engine.config.max_num_seqs} + max_queue_size "
                                f"{self._engine.config.max_queue_size})")

    def _overloaded(self, detail: str) -> QueueFullError:
        return QueueFullError(f"model '{self.context.name}' is overloaded: {detail}; retry later")

    @property
    def healthy(self) -> bool:
        return self._engine is not None and self._engine.healthy

    @property
    def failure(self) -> str | None:
        return None if self._engine is None else self._engine.failure

    def stats(self) -> dict[str, Any]:
        return self._engine.stats() if self._engine is not None else {}

    async def execute(self, jobs: list[Job]) -> None:
        """Start every job's generation; return when all have sent their final response."""
        await asyncio.gather(*(self._generate(job) for job in jobs))

    def _prepare(self, job: Job) -> tuple[ChatRequest, list[int], SamplingParams]:
        """Parse, render and compile the request's grammar (CPU work: runs in a worker thread)."""
        chat = parse_chat_request(job.request).resolved(self._sampling_defaults)
        prompt_ids = render_prompt(self._tokenizer, chat)
        return chat, prompt_ids, self._sampling_params(chat, len(prompt_ids), self._guide(chat))

    def _guide(self, chat: ChatRequest) -> Guide | None:
        if chat.json_schema is not None:
            constraint = Constraint("json_schema", chat.json_schema, JSON_SCHEMA)
        elif chat.grammar is not None:
            constraint = Constraint("grammar", chat.grammar, GRAMMAR)
        elif chat.tools and chat.tool_choice not in ("auto", "none"):
            # One call unless the client asks for more: offered more, a small model repeats its call.
            constraint = Constraint("grammar", call_grammar(chat.tools, chat.tool_choice,
                                                            chat.parallel_tool_calls is True), TOOL_CHOICE)
        else:
            return None
        return self._grammars.compile(constraint)

    async def _generate(self, job: Job) -> None:
        try:
            chat, prompt_ids, params = await asyncio.get_running_loop().run_in_executor(
                self._text_worker, self._prepare, job)
        except InferError as error:
            job.fail(error)
            return
        except ValueError as exc:  # the engine's own checks of the sampling values
            job.fail(InferError.invalid(str(exc)))
            return
        request_id = str(next(self._request_ids))
        abort = functools.partial(self._engine.abort, request_id)
        reply = _Reply(job, chat, ReplyText(self._tokenizer, prompt_ids, chat.stop), self._metrics, abort,
                       self._text_worker, self._logprob_entry if chat.logprobs else None)
        try:
            self._engine.add_request(request_id, prompt_ids, params, reply.on_output)
        except ValueError as exc:
            job.fail(InferError.invalid(f"prompt: {exc}"))
            return
        except EngineOverloaded as exc:
            job.fail(self._overloaded(str(exc)))
            return
        except EngineUnavailable as exc:  # unloading, or the engine gave up after faults
            job.fail(InferError.unavailable(f"model '{self.context.name}' is unavailable: {exc}"))
            return
        job.add_cancel_callback(abort)  # the engine then ends the request with "abort"
        await reply.done

    def _sampling_params(self, chat: ChatRequest, prompt_tokens: int, guide: Guide | None) -> SamplingParams:
        context = self._engine.config.max_model_len
        return SamplingParams(
            max_new_tokens=chat.reply_budget(prompt_tokens, context, self.context.name),
            temperature=chat.temperature,
            top_p=chat.top_p,
            top_k=chat.top_k,
            min_p=chat.min_p,
            repetition_penalty=chat.repetition_penalty,
            presence_penalty=chat.presence_penalty,
            frequency_penalty=chat.frequency_penalty,
            seed=chat.seed,
            stop_token_ids=frozenset() if chat.ignore_eos else self._stop_token_ids,
            logprobs=(chat.top_logprobs or 0) if chat.logprobs else None,
            guide=guide,
        )

    def _logprob_entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> bytes:
        """One token's logprobs as JSON (OpenAI's shape); called on the engine thread."""
        def one(token_id: int, value: float) -> dict[str, Any]:
            raw = self._bytes_of(token_id)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}
        return json.dumps({**one(token, logprob), "top_logprobs": [one(t, v) for t, v in top]}).encode()

    def _bytes_of(self, token: int) -> bytes:
        raw = self._token_bytes.get(token)
        if raw is None:
            raw = token_bytes(self._tokenizer, token)
            self._token_bytes[token] = raw
        return raw


def generation_defaults(generation_config: Any) -> dict[str, Any]:
    """The sampling values the model's generation_config sets explicitly (as HF's
    ``generate`` would use them); ``do_sample: false`` there means greedy."""
    if generation_config is None:
        return {}
    explicit = generation_config.to_diff_dict()
    defaults = {name: explicit[name] for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                if explicit.get(name) is not None}
    if explicit.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes a token stands for (byte-level BPE pieces may be part of a character)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    byte_of = _byte_decoder()
    if piece is not None and all(char in byte_of for char in piece):
        return bytes(byte_of[char] for char in piece)
    return tokenizer.decode([token]).encode("utf-8")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


@dataclass(slots=True)
class _Text:
    """What the text worker made of one engine output."""

    piece: str  # new text safe to send (at the end: with everything held back)
    stopped: bool  # a stop string ended the reply
    whole: str  # the reply so far


class _Reply:
    """One request's reply: engine outputs in (engine thread), text made on the text worker,
    responses out (event loop)."""

    def __init__(self, job: Job, chat: ChatRequest, text: ReplyText, metrics: LLMMetrics,
                 abort: Callable[[], None], text_worker: ThreadPoolExecutor,
                 logprob_entry: Callable[..., bytes] | None = None):
        self._job = job
        self._chat = chat
        self._text = text  # touched only on the text worker
        self._tool_calls = ToolCallReader(chat.tools) if chat.uses_tools else None
        self._logprob_entry = logprob_entry
        self._logprobs: list[bytes] = []  # entries not yet sent
        self._metrics = metrics
        self._abort = abort  # ends the engine request (a stop string ended the reply)
        self._text_worker = text_worker
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._completion_tokens = 0
        self._last_token_ns = 0

    def on_output(self, output: StepOutput) -> None:
        """The engine's callback: logprob entries here, text on the text worker, then the loop."""
        entries = None
        if self._logprob_entry is not None and output.logprobs:
            entries = [self._logprob_entry(*entry) for entry in output.logprobs]
        self._text_worker.submit(self._detokenize, output, entries)

    def _detokenize(self, output: StepOutput, logprobs: list[bytes] | None) -> None:
        try:
            piece = self._text.add(output.new_token_ids)
            if output.finished or self._text.stopped:
                piece += self._text.finish()
            text: _Text | Exception = _Text(piece, self._text.stopped, self._text.text)
        except Exception as exc:  # noqa: BLE001 - a fault in this reply ends it alone, on the loop
            text = exc
        self._loop.call_soon_threadsafe(self._handle, output, text, logprobs)

    def _handle(self, output: StepOutput, text: "_Text | Exception", logprobs: list[bytes] | None) -> None:
        if self.done.done():
            return  # ended by a stop string or a fault; the engine's "abort" for it follows
        try:
            if isinstance(text, Exception):
                raise text
            self._take(output, text, logprobs)
        except Exception as exc:  # a fault in this reply (detokenizer, stop strings) ends it alone
            logger.exception("request '%s' of model '%s': building the reply failed",
                             self._job.request.id, self._job.request.model_name)
            self._abort()
            if not self.done.done():
                self._job.fail(InferError.internal(f"generation failed: {type(exc).__name__}: {exc}"))
                self.done.set_result(None)

    def _take(self, output: StepOutput, text: _Text, logprobs: list[bytes] | None) -> None:
        if output.new_token_ids:
            self._observe_tokens(len(output.new_token_ids))
        if logprobs:
            self._logprobs.extend(logprobs)
        if output.finish_reason == "abort":
            self._end_aborted(output)
        elif text.stopped:
            self._abort()
            self._end("stop", output, text)
        elif output.finished:
            self._end(output.finish_reason, output, text)
        elif text.piece:
            piece = text.piece
            if self._tool_calls is not None:
                piece = self._tool_calls.feed(piece)
            if piece and self._chat.stream:
                self._send(InferResponse(self._job.request.model_name, self._job.request.model_version,
                                         self._job.request.id, outputs=[_text_tensor(RESPONSE, piece),
                                                                        *self._logprobs_tensor()],
                                         final=False))

    def _observe_tokens(self, count: int) -> None:
        now = time.monotonic_ns()
        if self._completion_tokens == 0:
            self._metrics.first_token((now - self._job.enqueue_ns) / 1e9)
        else:
            self._metrics.output_tokens((now - self._last_token_ns) / 1e9, count)
        self._completion_tokens += count
        self._last_token_ns = now

    def _end(self, finish_reason: str, output: StepOutput, text: _Text) -> None:
        """The final response: in a stream, this step's piece and whatever was held back."""
        rest, whole = text.piece, text.whole
        outputs = []
        if self._tool_calls is not None:
            rest = self._tool_calls.feed(rest)
            content, calls = self._tool_calls.finish()
            rest += content
            if calls:
                whole = content
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
                outputs.append(_texts_tensor(TOOL_CALLS, [json.dumps(call, ensure_ascii=False) for call in calls]))
        request = self._job.request
        outputs.insert(0, _text_tensor(RESPONSE, rest if self._chat.stream else whole))
        if self._chat.prompt is not None:
            outputs.append(InferTensor.from_numpy(HISTORY, self._chat.history_with(whole), "BYTES"))
        outputs.extend(self._logprobs_tensor())
        self._send(InferResponse(
            request.model_name, request.model_version, request.id,
            outputs=outputs,
            parameters={
                "prompt_tokens": output.prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "cached_tokens": output.cached_tokens,
                "finish_reason": finish_reason,
            },
        ))

    def _logprobs_tensor(self) -> list[InferTensor]:
        """The ``logprobs`` output with the entries not sent yet (none unless asked for)."""
        if self._logprob_entry is None:
            return []
        entries, self._logprobs = self._logprobs, []
        return [_texts_tensor(LOGPROBS, entries)]

    def _end_aborted(self, output: StepOutput) -> None:
        model = self._job.request.model_name
        if output.engine_fault:
            error = InferError.unavailable(f"model '{model}': {output.error}")
        elif output.error is not None:
            error = InferError.internal(f"generation failed: {output.error}")
        elif self._job.cancelled:
            error = InferError(ErrorCode.CANCELLED, "request was cancelled")
        else:
            error = InferError.unavailable(f"model '{model}' is being unloaded")
        self._job.fail(error)
        self.done.set_result(None)

    def _send(self, response: InferResponse) -> None:
        self._job.send(response)
        if response.final:
            self.done.set_result(None)


def _text_tensor(name: str, text: str) -> InferTensor:
    return InferTensor.from_numpy(name, np.array([text.encode("utf-8")], dtype=np.object_), "BYTES")


def _texts_tensor(name: str, texts: list[str | bytes]) -> InferTensor:
    array = np.empty(len(texts), dtype=np.object_)
    array[:] = [text if isinstance(text, bytes) else text.encode("utf-8") for text in texts]
    return InferTensor.from_numpy(name, array, "BYTES")


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages for reuse; hand them back (a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
