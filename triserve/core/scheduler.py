"""The per-model-version queue: batches jobs and runs them within the backend's capacity.

Without ``dynamic_batching`` every request is its own batch, as in Triton. With
it (and ``max_batch_size`` > 0) queued requests are gathered into one batch of
up to ``max_batch_size`` (summing each request's batch dimension); a batch
leaves at once when it reaches the largest ``preferred_batch_size`` (or
``max_batch_size``), otherwise when its oldest request has waited
``max_queue_delay_microseconds``. At most ``Backend.capacity`` batches execute
at once; the rest wait here.

Dispatch runs only when something changes (a job arrives, a batch ends, the
delay timer fires), so an idle model costs nothing and a request costs one
deque append plus, per batch, one task.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from tritonclient.grpc import model_config_pb2

from triserve.core.backend import Backend, Job
from triserve.core.errors import ErrorCode, InferError
from triserve.core.statistics import ModelStatistics


class Scheduler:
    def __init__(self, backend: Backend, config: model_config_pb2.ModelConfig,
                 statistics: ModelStatistics):
        self._backend = backend
        self._name = config.name
        self._statistics = statistics
        self._queue: deque[tuple[Job, int]] = deque()
        self._queued_size = 0  # sum of the queued jobs' batch sizes
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
        self._max_batch_size = config.max_batch_size if batching else 1
        preferred = config.dynamic_batching.preferred_batch_size if batching else ()
        self._target_size = max(preferred, default=self._max_batch_size)
        self._delay_ns = config.dynamic_batching.max_queue_delay_microseconds * 1000 if batching else 0

    def submit(self, job: Job, batch_size: int) -> None:
        """Queue a validated job; it runs as soon as a batch slot allows."""
        self._queue.append((job, batch_size))
        self._queued_size += batch_size
        self._statistics.pending += 1
        self._dispatch()

    def fail_queued(self, error: InferError) -> None:
        """End every job still waiting in the queue (the model is going away)."""
        while self._queue:
            self._pop().fail(error)

    def _dispatch(self) -> None:
        capacity = self._backend.capacity
        while self._queue and self._in_flight < capacity:
            if not self._batch_ready():
                self._arm_timer()
                return
            batch = self._take_batch()
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _batch_ready(self) -> bool:
        if self._delay_ns == 0 or self._queued_size >= self._target_size:
            return True
        return time.monotonic_ns() - self._queue[0][0].enqueue_ns >= self._delay_ns

    def _arm_timer(self) -> None:
        if self._timer is not None:
            return
        waited = time.monotonic_ns() - self._queue[0][0].enqueue_ns
        delay = max(self._delay_ns - waited, 0) / 1e9
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take_batch(self) -> list[tuple[Job, int]]:
        """Pop up to max_batch_size worth of jobs; cancelled ones are ended, not run."""
        batch: list[tuple[Job, int]] = []
        total = 0
        while self._queue:
            job, size = self._queue[0]
            if job.cancelled:
                self._pop().fail(InferError(ErrorCode.CANCELLED, "request was cancelled while queued"))
                continue
            if batch and total + size > self._max_batch_size:
                break
            self._pop()
            batch.append((job, size))
            total += size
        return batch

    def _pop(self) -> Job:
        job, size = self._queue.popleft()
        self._queued_size -= size
        self._statistics.pending -= 1
        return job

    async def _execute(self, batch: list[tuple[Job, int]]) -> None:
        jobs = [job for job, _ in batch]
        start = time.monotonic_ns()
        for job in jobs:
            job.start_ns = start
        try:
            await self._backend.execute(jobs)
        except InferError as error:
            self._fail_unfinished(jobs, error)
        except Exception as exc:  # a backend bug must not take the server down
            self._fail_unfinished(
                jobs, InferError.internal(f"model '{self._name}' failed to execute: {exc!r}")
            )
        finally:
            end = time.monotonic_ns()
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
