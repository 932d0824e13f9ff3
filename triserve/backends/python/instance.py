"""Instance processes of a Python model: one process's life, and the pool that supervises them.

:class:`InstanceProcess` is one ``stub/runner.py`` process and the jobs, batches
and BLS calls in flight on it. Its death is noticed at once: the end of file on its
socket (``FrameProtocol.connection_lost``) fails what it still owed with
UNAVAILABLE, naming the model and the instance.

:class:`InstancePool` keeps one slot per configured instance, hands idle
processes to batches, and restarts a process that died (``initialize`` runs
again) after an exponential backoff. While no process is alive the pool is not
healthy (the model is not ready); a slot that crashes more than
``max_instance_restarts`` times within ``instance_restart_window`` seconds makes
the pool failed, with the reason, until the model is loaded again.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from triserve.backends.python.ipc import (FrameProtocol, output_tensors, pack_array, request_payload, to_error,
                                          unpack_array)
from triserve.core import metrics
from triserve.core.backend import Job, ModelContext
from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor, RequestedOutput

STUB_DIR = Path(__file__).resolve().parent / "stub"
RUNNER = STUB_DIR / "runner.py"
_LOG_LEVELS = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
               "VERBOSE": logging.DEBUG}
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class InstanceSpec:
    """Where one instance runs, as Triton's ``initialize(args)`` describes it."""

    name: str
    kind: str  # "CPU", "GPU" or "MODEL", as args["model_instance_kind"]
    device_id: int


@dataclass(frozen=True)
class Launch:
    """What every process of a model is started with."""

    python: Path
    env: dict[str, str]
    model_file: Path
    model_config_json: str


class InstanceProcess:
    """One runner process and the jobs, batches and BLS calls in flight on it."""

    def __init__(self, context: ModelContext, spec: InstanceSpec,
                 on_death: Callable[["InstanceProcess", str], None] = lambda *_: None):
        self.context = context
        self.spec = spec
        self.pid = 0
        self._on_death = on_death
        self._process: subprocess.Popen | None = None
        self._protocol: FrameProtocol | None = None
        self._control: FrameProtocol | None = None  # cancellations and BLS responses
        self._closed = asyncio.Event()  # the socket closed; _exit_task then cleans up
        self._exit_task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._finalized: asyncio.Future | None = None
        self._jobs: dict[int, Job] = {}
        self._held: set[int] = set()  # jobs whose reader fell behind: the socket is not read
        # batch id -> [called when it ended, its jobs, its execute deadline's timer], in the order
        # sent: the process runs them in that order, and only the first one's deadline runs
        self._batches: dict[int, list] = {}
        self._bls_tasks: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._alive = False
        self._death_reason = ""  # why the server ended the process (execute deadline), if it did
        self._serving = False  # initialize succeeded: a death from now on is a crash to supervise

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def label(self) -> str:
        return f"model '{self.context.name}' instance '{self.spec.name}'"

    async def start(self, launch: Launch) -> None:
        """Start the process and run the model's ``initialize``, within the initialize deadline."""
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        parent_control, child_control = socket.socketpair()
        env = dict(launch.env)
        if self.spec.kind == "GPU":
            env["CUDA_VISIBLE_DEVICES"] = str(self.spec.device_id)
        try:
            # subprocess.Popen, not the event loop's subprocess support: CPython spawns with
            # vfork, which runs no fork handlers (gRPC's, under uvloop, crash a forked child).
            # Its own session keeps a Ctrl-C to the server's process group from killing the
            # instance before the server finalizes it.
            self._process = subprocess.Popen(
                [str(launch.python), str(RUNNER), str(child_sock.fileno()), str(child_control.fileno())],
                pass_fds=(child_sock.fileno(), child_control.fileno()), env=env,
                start_new_session=True)
        finally:
            child_sock.close()
            child_control.close()
        _, self._protocol = await loop.create_unix_connection(
            lambda: FrameProtocol(self._dispatch, self._on_closed), sock=parent_sock)
        _, self._control = await loop.create_unix_connection(
            lambda: FrameProtocol(self._dispatch, lambda: None), sock=parent_control)
        self._alive = True
        self._ready = loop.create_future()
        self._send(("initialize", str(launch.model_file), {
            "model_config": launch.model_config_json,
            "model_instance_kind": self.spec.kind,
            "model_instance_name": self.spec.name,
            "model_instance_device_id": str(self.spec.device_id),
            "model_repository": str(self.context.model_dir),
            "model_version": str(self.context.version),
            "model_name": self.context.name,
        }))
        deadline = self.context.lifecycle.initialize_timeout
        try:
            self.pid = await asyncio.wait_for(asyncio.shield(self._ready), deadline or None)
        except asyncio.TimeoutError:
            self._death_reason = f"initialize did not finish within {deadline:g} s"
            self._ready.cancel()
            await self.kill()
            raise InferError.unavailable(
                f"{self.label}: initialize did not finish within {deadline:g} s "
                "(raise --initialize-timeout or the model's 'initialize_timeout' parameter)") from None

    def send_batch(self, jobs: list[Job], on_done: Callable[[], None]) -> None:
        """Send a batch to the process without suspending; ``on_done`` runs once its execute
        returned (the ``done`` frame) or the process died. Raises UNAVAILABLE if it is not running."""
        if not self._alive:
            raise InferError.unavailable(f"{self.label} is not running")
        ids = self._ids
        batch_id = next(ids)
        job_ids = [next(ids) for _ in jobs]
        # behind a running batch, a request's queue timeout goes with it: the process refuses it
        # if the timeout passed before its turn came (run now, it is no longer queued)
        queued = bool(self._batches)
        self._protocol.send(("execute", batch_id, [
            request_payload(job_id, job.request, job.deadline_ns if queued else 0)
            for job_id, job in zip(job_ids, jobs)]))
        # registered once sent (the reply cannot come before we return to the loop), so a
        # request that cannot be encoded leaves nothing behind
        for job_id, job in zip(job_ids, jobs):
            self._jobs[job_id] = job
            job.add_cancel_callback(functools.partial(self._send_control, ("cancel", job_id)))
            job.set_flow_control(functools.partial(self._hold, job_id))
        self._batches[batch_id] = [on_done, jobs, None]
        if len(self._batches) == 1:
            self._arm_deadline(batch_id)

    def _arm_deadline(self, batch_id: int) -> None:
        """The execute deadline of the batch the process runs now (one sent behind it waits its turn)."""
        deadline = self.context.lifecycle.execute_timeout
        if deadline:
            self._batches[batch_id][2] = asyncio.get_running_loop().call_later(deadline, self._overran, deadline)

    async def execute(self, jobs: list[Job]) -> None:
        """:meth:`send_batch`, then wait until the batch ended."""
        done = asyncio.get_running_loop().create_future()
        self.send_batch(jobs, lambda: done.done() or done.set_result(None))
        await self._protocol.writable()
        await done

    def _end_batch(self, batch_id: int, started_ns: int = 0) -> None:
        """A batch's execute returned (at ``started_ns`` it had begun, by the process's clock,
        which is the same CLOCK_MONOTONIC as ours) or the process died."""
        on_done, jobs, timer = self._batches.pop(batch_id)
        if timer is not None:
            timer.cancel()
        for job in jobs:  # the time it waited behind the batch before it is queue time, not compute
            job.start_ns = max(job.start_ns, started_ns)
        if self._batches and self._alive:
            self._arm_deadline(next(iter(self._batches)))
        on_done()

    def _overran(self, deadline: float) -> None:
        """``execute`` ran past its deadline: the process is killed (its jobs fail) and restarted."""
        if not self._alive or self._process is None:
            return
        self._death_reason = f"execute did not return within {deadline:g} s"
        self.context.logger.error("%s: %s; killing the instance process to restart it",
                                  self.label, self._death_reason)
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self._process.pid, sig)
        except (ProcessLookupError, AttributeError):
            pass

    async def kill(self) -> None:
        """End the process now (no finalize) and wait until its end is handled."""
        if self._process is None:
            return
        self._signal(signal.SIGKILL)
        await asyncio.to_thread(self._process.wait)
        await self._closed.wait()
        await self._exit_task

    async def stop(self) -> None:
        """Run ``finalize`` within its deadline, then end the process."""
        if self._process is None:
            return
        deadline = self.context.lifecycle.finalize_timeout
        if self._alive:
            self._finalized = asyncio.get_running_loop().create_future()
            self._send(("finalize",))
            try:
                await asyncio.wait_for(asyncio.shield(self._finalized), deadline or None)
            except asyncio.TimeoutError:
                self.context.logger.warning("%s: finalize did not finish within %g s; killing it",
                                            self.label, deadline)
                self._signal(signal.SIGKILL)
        self._protocol.close()
        self._control.close()
        try:
            await asyncio.to_thread(self._process.wait, deadline or None)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
        await self._closed.wait()
        await self._exit_task
        self._process = None

    # -- frames -------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        if self._alive:
            self._protocol.send(message)

    def _send_control(self, message: tuple) -> None:
        if self._alive:
            self._control.send(message)

    def _hold(self, job_id: int, hold: bool) -> None:
        """Back-pressure for a request whose client stopped reading (core/flow.py): the process's
        responses are not read while any of its requests is held, so a model sending faster than
        its client reads blocks in ``response_sender.send`` instead of filling the server's memory.
        Cancellations and BLS answers travel on the control socket, which is always read."""
        was_held = bool(self._held)
        if hold and job_id in self._jobs:
            self._held.add(job_id)
        else:
            self._held.discard(job_id)
        if bool(self._held) != was_held and self._alive:
            self._protocol.hold_reading(bool(self._held))

    def _on_closed(self) -> None:
        self._closed.set()
        self._exit_task = asyncio.create_task(self._exited())

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "response":
            self._on_response(*message[1:])
        elif kind == "done":
            self._end_batch(message[1], message[2])
        elif kind == "bls":
            task = asyncio.create_task(self._run_bls(*message[1:]))
            self._bls_tasks.add(task)
            task.add_done_callback(self._bls_tasks.discard)
        elif kind == "log":
            self.context.logger.log(_LOG_LEVELS.get(message[1], logging.INFO), "%s: %s",
                                    self.spec.name, message[2])
        elif kind == "ready":
            self._serving = True
            self._ready.set_result(message[1])
        elif kind == "load_failed":
            self.context.logger.error("%s failed to load:\n%s", self.label, message[2])
            self._ready.set_exception(InferError.unavailable(
                f"model '{self.context.name}' failed to initialize: {message[1]}"))
        elif kind == "finalized" and self._finalized is not None:
            self._finalized.set_result(None)

    def _on_response(self, job_id: int, outputs: list, error: tuple[str, str] | None,
                     parameters: dict, final: bool) -> None:
        job = self._jobs.pop(job_id) if final else self._jobs.get(job_id)
        if job is None:
            return
        if final and self._held:
            self._hold(job_id, False)
        request = job.request
        if error is not None:
            response = InferResponse(request.model_name, request.model_version, request.id,
                                     parameters=parameters, final=final, error=to_error(*error))
        else:
            try:
                tensors = output_tensors(outputs)
            except ValueError as exc:
                response = InferResponse(request.model_name, request.model_version, request.id,
                                         final=final, error=InferError.internal(str(exc)))
            else:
                response = InferResponse(request.model_name, request.model_version, request.id,
                                         outputs=tensors, parameters=parameters, final=final)
        job.send(response)

    async def _exited(self) -> None:
        """The process is gone: fail what it still owed, unblock waiters, tell the pool."""
        was_alive, self._alive = self._alive, False
        returncode = await asyncio.to_thread(self._process.wait) if self._process else None
        why = self._death_reason or f"process exited (exit code {returncode})"
        message = f"{self.label} {why}"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(InferError.unavailable(f"{message} during initialize"))
        unexpected = self._finalized is None and was_alive
        if self._finalized is not None and not self._finalized.done():
            self._finalized.set_result(None)
        if self._jobs:
            error = InferError.unavailable(f"{message}; the request was lost with it")
            for job in self._jobs.values():
                job.fail(error)
            self._jobs.clear()
        self._held.clear()
        for batch_id in list(self._batches):
            self._end_batch(batch_id)
        if unexpected and self._serving:
            self._on_death(self, why)

    # -- BLS ------------------------------------------------------------------------

    async def _run_bls(self, bls_id: int, model_name: str, version: str, request_id: str,
                       parameters: str, inputs: list, outputs: list[str]) -> None:
        """Send a model's BLS request through the core and its responses back to it."""
        final_sent = False
        try:
            request = InferRequest(
                model_name, version, request_id,
                inputs=[InferTensor.from_numpy(name, unpack_array(data)) for name, data in inputs],
                outputs=[RequestedOutput(name) for name in outputs],
                parameters=json.loads(parameters))
            async for response in self.context.core.stream(request):
                error = None if response.error is None else (response.error.code.value,
                                                             response.error.message)
                tensors = [(tensor.name, pack_array(tensor.data)) for tensor in response.outputs]
                self._send_control(("bls_response", bls_id, tensors, error,
                                    response.parameters, response.final))
                final_sent = response.final
                if final_sent:
                    break
        except InferError as exc:
            self._send_control(("bls_response", bls_id, [], (exc.code.value, exc.message), {}, True))
            final_sent = True
        except ValueError as exc:
            self._send_control(("bls_response", bls_id, [],
                                (ErrorCode.INVALID_ARGUMENT.value, str(exc)), {}, True))
            final_sent = True
        except Exception as exc:  # a bug: the model's exec() still gets its final response, not a hang
            self.context.logger.exception("BLS request of model '%s' failed", self.context.name)
            self._send_control(("bls_response", bls_id, [],
                                (ErrorCode.INTERNAL.value, f"internal error: {exc}"), {}, True))
            final_sent = True
        if not final_sent:
            self._send_control(("bls_response", bls_id, [], None, {}, True))


class _Slot:
    """One configured instance across its processes' lives."""

    __slots__ = ("spec", "process", "crashes", "restart_task")

    def __init__(self, spec: InstanceSpec):
        self.spec = spec
        self.process: InstanceProcess | None = None
        self.crashes: collections.deque[float] = collections.deque()  # monotonic times
        self.restart_task: asyncio.Task | None = None


class InstancePool:
    """The instances of one model version: idle ones for the next batch, dead ones restarted."""

    def __init__(self, context: ModelContext, specs: list[InstanceSpec], launch: Launch, depth: int = 1):
        self.context = context
        self._launch = launch
        self.depth = depth  # batches one process may hold: the one it runs and those sent behind it
        self._slots = [_Slot(spec) for spec in specs]
        self._idle: collections.deque[InstanceProcess] = collections.deque()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._alive = 0
        self._failure: str | None = None
        self._stopping = False

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def healthy(self) -> bool:
        return self._alive > 0 and self._failure is None

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def processes(self) -> list[InstanceProcess]:
        return [slot.process for slot in self._slots if slot.process is not None]

    async def start(self) -> None:
        """Start every instance; if one fails, stop the others and raise its error."""
        results = await asyncio.gather(*(self._start(slot) for slot in self._slots),
                                       return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self.stop()
            raise failure
        for slot in self._slots:
            for _ in range(self.depth):
                self._release(slot.process)

    async def _start(self, slot: _Slot) -> None:
        process = InstanceProcess(self.context, slot.spec, self._on_death)
        slot.process = process
        await process.start(self._launch)
        self._alive += 1

    async def acquire(self) -> InstanceProcess:
        """An idle live instance; waits while all are busy or restarting; UNAVAILABLE once failed."""
        process = self.try_acquire()
        if process is not None:
            return process
        if self._failure is not None:
            raise InferError.unavailable(self._failure)
        if self._stopping:
            raise InferError.unavailable(f"model '{self.context.name}' is being unloaded")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def try_acquire(self) -> InstanceProcess | None:
        """An idle live instance at once, or None (all busy, restarting, failed or stopping)."""
        while self._idle:
            process = self._idle.popleft()
            if process.alive:
                return process
        return None

    def release(self, process: InstanceProcess) -> None:
        """A batch ended on ``process``: it serves the next one unless it died meanwhile."""
        if process.alive and not self._stopping:
            self._release(process)

    def _release(self, process: InstanceProcess) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(process)
                return
        self._idle.append(process)

    def _on_death(self, process: InstanceProcess, why: str) -> None:
        """A live process died (crash, kill, execute deadline): count it and schedule a restart."""
        slot = next((s for s in self._slots if s.process is process), None)
        if slot is None or self._stopping:
            return
        self._alive -= 1
        self._idle = collections.deque(p for p in self._idle if p is not process)
        self._schedule_restart(slot, why)

    def _schedule_restart(self, slot: _Slot, why: str) -> None:
        lifecycle = self.context.lifecycle
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and now - slot.crashes[0] > lifecycle.instance_restart_window:
            slot.crashes.popleft()
        label = f"model '{self.context.name}' instance '{slot.spec.name}'"
        if len(slot.crashes) > lifecycle.max_instance_restarts:
            self._fail(f"{label} failed {len(slot.crashes)} times within "
                       f"{lifecycle.instance_restart_window:g} s (last: {why}); load the model "
                       "again once it is fixed")
            return
        delay = min(_FIRST_BACKOFF_S * 2 ** (len(slot.crashes) - 1), _MAX_BACKOFF_S)
        self.context.logger.error(
            "%s %s; restarting it in %.1f s (restart %d of %d allowed within %g s)", label, why,
            delay, len(slot.crashes), lifecycle.max_instance_restarts,
            lifecycle.instance_restart_window)
        slot.restart_task = asyncio.create_task(self._restart(slot, delay))

    async def _restart(self, slot: _Slot, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping or self._failure is not None:
            return
        metrics.count_instance_restart(self.context.name, self.context.version)
        try:
            await self._start(slot)
        except Exception as exc:  # initialize failed or timed out: counts as one more crash
            slot.process = None
            self._schedule_restart(slot, f"failed to restart: {exc}")
            return
        self.context.logger.warning("model '%s' instance '%s' restarted (pid %d)",
                                    self.context.name, slot.spec.name, slot.process.pid)
        for _ in range(self.depth):
            self._release(slot.process)

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self.context.logger.error("%s", reason)
        error = InferError.unavailable(reason)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def stop(self) -> None:
        """Stop restarting, fail waiters, finalize every live process."""
        self._stopping = True
        tasks = [slot.restart_task for slot in self._slots if slot.restart_task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        error = InferError.unavailable(f"model '{self.context.name}' is being unloaded")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        self._idle.clear()
        await asyncio.gather(*(process.stop() for process in self.processes))
        for slot in self._slots:
            slot.process = None
        self._alive = 0
