"""The per-model-version queue: batches jobs and runs them within the backend's capacity.

Without ``dynamic_batching`` every request is its own batch, as in Triton. With
it (and ``max_batch_size`` > 0) queued requests are gathered into one batch of
up to ``max_batch_size`` (summing each request's batch dimension); a batch
leaves at once when it reaches the largest ``preferred_batch_size`` (or
``max_batch_size``), otherwise when its oldest request has waited
``max_queue_delay_microseconds``. At most ``Backend.capacity`` batches execute
at once; the rest wait here.

Dispatch runs only when something changes (a job arrives, a batch ends, the
delay timer fires), so an idle model costs nothing. A request that finds the
queue empty and a batch slot free (no batching delay to wait for) skips the
queue: it is handed to the backend from the caller's own task. A backend that
can start a batch without suspending (``Backend.try_execute``: an idle instance) costs
no task at all; the batch ends in the backend's I/O callback. Otherwise each
batch is one task awaiting ``Backend.execute``.

Queue policy, as Triton's ``dynamic_batching { default_queue_policy { ... } }``:
``max_queue_size`` (0 = unbounded) refuses a request that finds that many
queued (not yet executing) with UNAVAILABLE "Exceeds maximum queue size";
``default_timeout_microseconds`` bounds a request's time in the queue, and
``allow_timeout_override`` lets a request's own ``timeout`` parameter
(microseconds, Triton's) shorten it. On expiry ``timeout_action`` REJECT ends the
request with UNAVAILABLE "Request timeout expired"; DELAY moves it behind the
requests that have not expired. A model without ``dynamic_batching`` has no
queue policy; there a request's ``timeout`` parameter bounds its queue time
(REJECT).

Priority, as Triton's ``dynamic_batching { priority_levels: N default_priority_level: K }``:
one queue per level, level 1 the highest; a batch is taken from the highest level that has
a request waiting. A request's ``priority`` parameter (HTTP ``parameters``, gRPC
``priority``) picks its level, 0 or none the default level; a priority above N is refused
with INVALID_ARGUMENT naming it (Triton would quietly use the default). Each level has its
queue policy: ``priority_queue_policy[level]``, else ``default_queue_policy``
(``max_queue_size`` counts per level, as in Triton). Without ``priority_levels`` a
``priority`` is accepted and changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from tritonclient.grpc import model_config_pb2

from triserve.core.backend import Backend, Job
from triserve.core.errors import ErrorCode, InferError, QueueFullError
from triserve.core.statistics import ModelStatistics


TIMEOUT_EXPIRED = "Request timeout expired"  # Triton's text, UNAVAILABLE
CANCELLED_WHILE_QUEUED = "request was cancelled while queued"  # CANCELLED
TIMEOUT_PARAMETER = "timeout"  # a request's own timeout, microseconds (Triton's)
PRIORITY_PARAMETER = "priority"  # a request's priority level (Triton's; 1 is the highest, 0 the default)

_Entry = tuple[Job, int, int]  # job, batch size, queue deadline (monotonic ns; 0 = none)


class _Level:
    """One priority level's queue and its queue policy (Triton's ``PolicyQueue``): requests
    waiting in arrival order, then those moved back after their timeout under DELAY."""

    __slots__ = ("queue", "delayed", "max_queue_size", "default_timeout_ns", "allow_override",
                 "delay_expired")

    def __init__(self, policy: model_config_pb2.ModelQueuePolicy | None):
        self.queue: deque[_Entry] = deque()
        self.delayed: deque[_Entry] = deque()  # expired under timeout_action DELAY
        self.max_queue_size = policy.max_queue_size if policy is not None else 0
        self.default_timeout_ns = policy.default_timeout_microseconds * 1000 if policy is not None else 0
        self.allow_override = policy.allow_timeout_override if policy is not None else True
        self.delay_expired = policy is not None and policy.timeout_action == model_config_pb2.ModelQueuePolicy.DELAY

    def __len__(self) -> int:
        return len(self.queue) + len(self.delayed)

    def head(self) -> deque[_Entry] | None:
        return self.queue or self.delayed or None


class Scheduler:
    def __init__(self, backend: Backend, config: model_config_pb2.ModelConfig,
                 statistics: ModelStatistics):
        self._backend = backend
        self._name = config.name
        self._statistics = statistics
        self._queued_size = 0  # sum of the queued jobs' batch sizes
        self._queued = 0  # jobs queued, all levels
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_ns = 0  # when the armed sweep fires
        batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
        self._max_batch_size = config.max_batch_size if batching else 1
        preferred = config.dynamic_batching.preferred_batch_size if batching else ()
        self._target_size = max(preferred, default=self._max_batch_size)
        self._delay_ns = config.dynamic_batching.max_queue_delay_microseconds * 1000 if batching else 0
        dynamic = config.dynamic_batching
        if config.HasField("dynamic_batching"):
            # one queue per priority level (index 0 is level 1, the highest), each with its policy
            self._priority_levels = dynamic.priority_levels
            self._default_level = dynamic.default_priority_level
            self._levels = [_Level(dynamic.priority_queue_policy[level]
                                   if level in dynamic.priority_queue_policy else dynamic.default_queue_policy)
                            for level in range(1, max(self._priority_levels, 1) + 1)]
        else:
            self._priority_levels = self._default_level = 0
            self._levels = [_Level(None)]

    def submit(self, job: Job, batch_size: int) -> None:
        """Queue a validated job; it runs as soon as a batch slot allows.

        Raises INVALID_ARGUMENT for a ``priority`` parameter outside the model's
        ``priority_levels``, and UNAVAILABLE ("Exceeds maximum queue size",
        :class:`QueueFullError`) when the request's level's queue is full, or when ``capacity``
        batches execute and the backend bounds its own queue (``Backend.refusal_when_full``:
        the LLM engine's waiting queue).
        """
        index = self._level_index(job)
        level = self._levels[index]
        if level.max_queue_size and len(level) >= level.max_queue_size:
            self._statistics.record_failure("REJECTED", 0)
            where = f" at priority level {index + 1}" if self._priority_levels else ""
            raise QueueFullError(
                f"model '{self._name}' has {level.max_queue_size} request(s) queued{where} "
                "(dynamic_batching queue policy max_queue_size)")
        if self._in_flight >= self._backend.capacity:
            refusal = self._backend.refusal_when_full()  # a backend that bounds its own queue
            if refusal is not None:
                self._statistics.record_failure("REJECTED", 0)
                raise refusal
        timeout_ns = self._timeout_ns(job, level)
        deadline = job.deadline_ns = job.enqueue_ns + timeout_ns if timeout_ns else 0
        if (self._in_flight < self._backend.capacity and not self._queued
                and (self._delay_ns == 0 or batch_size >= self._target_size)):
            # Nothing waits before it and nothing to gather: it goes to the backend now, never
            # queued here (a backend that holds it behind a running batch keeps its deadline).
            self._in_flight += 1
            self._run([(job, batch_size)])
            return
        level.queue.append((job, batch_size, deadline))
        self._queued += 1
        self._queued_size += batch_size
        self._statistics.pending += 1
        self._dispatch()
        if deadline and self._queued and (not self._sweep_ns or deadline < self._sweep_ns):
            self._arm_sweep(deadline)

    def _level_index(self, job: Job) -> int:
        """The queue a job waits in: its ``priority`` (1 = highest), or the default level."""
        requested = job.request.parameters.get(PRIORITY_PARAMETER)
        if requested is None:
            priority = 0
        elif isinstance(requested, int) and not isinstance(requested, bool) and requested >= 0:
            priority = requested
        else:
            raise InferError.invalid(
                f"request parameter 'priority' must be a non-negative integer, got {requested!r}")
        if not self._priority_levels:
            return 0  # one queue: a priority is accepted and changes nothing (Triton's rule)
        if priority > self._priority_levels:
            raise InferError.invalid(
                f"request parameter 'priority' {priority} is out of range for model '{self._name}': "
                f"its dynamic_batching priority_levels is {self._priority_levels} "
                f"(1 is the highest; 0 or none: default_priority_level {self._default_level})")
        return (priority or self._default_level) - 1

    def _timeout_ns(self, job: Job, level: _Level) -> int:
        """The job's queue timeout: its level's default, or the request's own if allowed."""
        timeout_ns = level.default_timeout_ns
        if level.allow_override:
            requested = job.request.parameters.get(TIMEOUT_PARAMETER)
            if requested:
                try:
                    requested_ns = int(requested) * 1000
                except (TypeError, ValueError):
                    requested_ns = 0
                if requested_ns > 0 and (not timeout_ns or requested_ns < timeout_ns):
                    timeout_ns = requested_ns
        return timeout_ns

    def fail_queued(self, error: InferError) -> None:
        """End every job still waiting in the queue (the model is going away)."""
        while self._queued:
            self._pop().fail(error)

    def _head(self) -> deque[_Entry] | None:
        """The deque the next job comes from: the highest level with a waiting job."""
        for level in self._levels:
            entries = level.head()
            if entries is not None:
                return entries
        return None

    def _arm_sweep(self, deadline_ns: int) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_ns = deadline_ns
        delay = max(deadline_ns - time.monotonic_ns(), 0) / 1e9
        self._sweep = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        """End (REJECT) or move back (DELAY) the queued jobs whose queue timeout passed."""
        self._sweep, self._sweep_ns = None, 0
        now = time.monotonic_ns()
        next_deadline = 0
        for level in self._levels:
            kept: deque[_Entry] = deque()
            for entry in level.queue:
                deadline = entry[2]
                if deadline and deadline <= now:
                    if level.delay_expired:
                        level.delayed.append((entry[0], entry[1], 0))
                    else:
                        self._queued -= 1
                        self._queued_size -= entry[1]
                        self._statistics.pending -= 1
                        entry[0].fail(InferError.unavailable(TIMEOUT_EXPIRED))
                    continue
                if deadline and (not next_deadline or deadline < next_deadline):
                    next_deadline = deadline
                kept.append(entry)
            level.queue = kept
        if next_deadline:
            self._arm_sweep(next_deadline)
        self._dispatch()

    def _dispatch(self) -> None:
        capacity = self._backend.capacity
        while self._queued and self._in_flight < capacity:
            if not self._batch_ready():
                self._arm_timer()
                return
            batch = self._take_batch()
            if not batch:
                continue
            self._in_flight += 1
            self._run(batch)

    def _batch_ready(self) -> bool:
        if self._delay_ns == 0 or self._queued_size >= self._target_size or not self._queued:
            return True
        return time.monotonic_ns() - self._head()[0][0].enqueue_ns >= self._delay_ns

    def _arm_timer(self) -> None:
        if self._timer is not None:
            return
        waited = time.monotonic_ns() - self._head()[0][0].enqueue_ns
        delay = max(self._delay_ns - waited, 0) / 1e9
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take_batch(self) -> list[tuple[Job, int]]:
        """Pop up to max_batch_size worth of jobs, highest priority first; cancelled and expired
        ones are ended, not run."""
        batch: list[tuple[Job, int]] = []
        total = 0
        while self._queued:
            job, size, deadline = self._head()[0]
            if job.cancelled:
                self._pop().fail(InferError(ErrorCode.CANCELLED, CANCELLED_WHILE_QUEUED))
                continue
            if deadline and deadline <= time.monotonic_ns():  # expired before the sweep saw it
                level = next(level for level in self._levels if level.head() is not None)
                if level.delay_expired:
                    level.delayed.append((level.queue.popleft()[0], size, 0))
                else:
                    self._pop().fail(InferError.unavailable(TIMEOUT_EXPIRED))
                continue
            if batch and total + size > self._max_batch_size:
                break
            self._pop()
            batch.append((job, size))
            total += size
        return batch

    def _pop(self) -> Job:
        job, size, _ = self._head().popleft()
        self._queued -= 1
        self._queued_size -= size
        self._statistics.pending -= 1
        return job

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        """Hand one batch (its slot already counted in ``_in_flight``) to the backend."""
        jobs = [job for job, _ in batch]
        start = time.monotonic_ns()
        for job in jobs:
            job.start_ns = start
        ended = False

        def on_done(error: BaseException | None = None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._finish(batch, jobs, error)

        try:
            started = self._backend.try_execute(jobs, on_done)
        except Exception as exc:  # nothing started: the batch ends with the error
            on_done(exc)
            return
        if not started:
            task = asyncio.get_running_loop().create_task(self._execute(jobs, on_done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, jobs: list[Job], on_done: Callable[[BaseException | None], None]) -> None:
        error = None
        try:
            await self._backend.execute(jobs)
        except Exception as exc:
            error = exc
        finally:
            on_done(error)

    def _finish(self, batch: list[tuple[Job, int]], jobs: list[Job], error: BaseException | None) -> None:
        """A batch ended: fail what it left unanswered, count it, let the next batch run."""
        if isinstance(error, InferError):
            self._fail_unfinished(jobs, error)
        elif error is not None:  # a backend bug must not take the server down
            self._fail_unfinished(
                jobs, InferError.internal(f"model '{self._name}' failed to execute: {error!r}"))
        end = time.monotonic_ns()
        start = jobs[0].start_ns  # when _run handed it over, or later where the backend started it later
        self._statistics.record_execution(
            sum(size for _, size in batch), [start - job.enqueue_ns for job in jobs], end - start
        )
        self._in_flight -= 1
        self._dispatch()

    @staticmethod
    def _fail_unfinished(jobs: list[Job], error: InferError) -> None:
        for job in jobs:
            if not job.done:
                job.fail(error)
