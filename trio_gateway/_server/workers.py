"""Several worker processes serving one port: the parent that supervises them, and each worker.

Theory of operation
===================

``trio-gateway serve`` with ``[server] workers = N`` (or ``--workers N``),
N > 1, runs one **parent** process and N **worker** processes. Each worker
is a whole gateway, the same one ``workers = 1`` runs: its own
:func:`~trio_gateway._server.serve.serve`, hypercorn server, HTTP/1.1 protocol
(:mod:`~trio_gateway._server.hypercorn_private`), upstream pools, usage store
connection and request log. The parent serves nothing.

Why not hypercorn's own workers, and why not SO_REUSEPORT
-------------------------------------------------------------

Hypercorn's ``workers`` setting (``hypercorn.run.run``) starts each worker
with its own ``worker_serve`` on an application path it imports: our
:func:`serve` (the drain in steps, the usage store's start and drain) would not
run, and its parent knows one shutdown step only, stops every worker when one
fails, and restarts none. ``SO_REUSEPORT``, one socket per worker, lets a
worker that dies take the connections waiting in its own accept queue with
it (they are reset), and a replacement must bind again; with port 0 the
workers would not even agree on a port. So:

1. **The parent owns the listening socket.** It makes it once, before any
   worker starts, with the gateway's settings (``TCP_USER_TIMEOUT``, through
   :func:`~trio_gateway._server.serve.hypercorn_settings`), and calls
   ``listen``. Every worker inherits it as a file descriptor (``pass_fds``)
   and serves it as hypercorn's ``fd://N`` bind; the kernel hands each new
   connection to whichever worker accepts first, so a busy worker takes
   fewer. A replacement worker inherits the same socket: no connection
   waiting in the queue is lost when a worker dies, and the port never
   changes. The parent prints ``trio-gateway listening on URL`` once, when
   every worker is ready, and closes its own copy when shutdown begins: once
   every worker has stopped accepting, the socket is closed and a new
   connection is refused at once, as with one process (not left waiting in
   the queue for no one).
2. **The parent forwards signals.** Workers run in a process group of their
   own, so a Ctrl-C at a terminal reaches the parent only. The parent counts
   SIGINT and SIGTERM as :func:`serve` does and sends each one it receives
   to every ready worker, which takes the same step: the first drains
   (``timeouts.shutdown``), the second cuts every worker's grace to zero,
   the third ends every worker and then the parent at once. A worker that
   becomes ready after shutdown began gets one SIGTERM then. A worker's
   signal handling is :func:`serve`'s own, so a signal sent to one worker
   (``kill -TERM <pid>``) drains that worker alone, which then exits and is
   replaced: a graceful recycle. (Under systemd, use ``KillMode=mixed``, so
   that ``systemctl stop`` signals the parent only: with the default
   ``control-group`` every worker would get the signal twice, and take the
   second step at once.)
3. **The parent reaps the workers.** One task per worker slot waits for its
   process. A worker that exits when the parent did not ask it to is logged
   with its pid and exit status or signal, and replaced, unless the parent
   is shutting down: after 0.1 s, doubling for each failure in a row of that
   slot, at most 10 s. A failure is a death by a signal, a non-zero status,
   or an exit before the worker was ready; a clean exit (status 0, after a
   signal sent to the worker alone) is replaced at the first delay and is
   no failure. A worker that served for 60 s clears its slot's failures.
   After 5 failures in a row, or when a worker of the first start fails
   before every worker was ready (a bad database, say), the parent gives up:
   it shuts the other workers down as on a first signal, and exits with the
   failed worker's status.
4. **Each worker watches the parent.** A worker's standard input is one end
   of a socket pair whose other end only the parent holds. The worker
   writes ``ready`` to it once :func:`serve` has started (signals are then
   handled), and reads it: the end of input means the parent has gone
   (``kill -9``), and the worker drains as on a first signal, so no worker
   outlives its parent by more than its drain.
5. **Exit status.** The parent exits once every worker has exited: 0 when
   every worker's last exit was 0, otherwise the first failure's status (a
   worker's own status, or 128 + the signal that ended it).
6. **Metrics are the whole gateway's.** The parent makes a fresh temporary
   folder and gives it to every worker as ``PROMETHEUS_MULTIPROC_DIR``, in
   the environment the worker starts with (before it imports
   prometheus_client); each worker switches its
   :class:`~trio_gateway._accounting.metrics.GatewayMetrics` to multiprocess
   mode (see that module), and copies its store's figures into its files
   every second and once more at its end. The parent marks each dead
   worker's live gauges dead (``mark_process_dead``) and removes the folder
   when it exits.

Shared by the workers: the listening socket, the config file (each worker
reads it when it starts: edit it only to restart the whole gateway), the
usage database file (each worker has its own connection), the rate limits
in Redis (``[limits] redis_url``; without it, configured limits are refused
with ``workers > 1``, since each worker would enforce them alone), standard
error (every worker's log lines, each with its pid) and the metrics folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import trio
from prometheus_client import multiprocess

from trio_gateway._core.config import GatewayConfig
from trio_gateway._proxy.app import Gateway
from trio_gateway._server.serve import _SHUTDOWN_SIGNALS, _end_process, hypercorn_settings, serve

__all__ = ["run_workers", "serve_worker"]

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_READY = b"ready\n"
_FIRST_DELAY = 0.1  # seconds before a dead worker's replacement starts...
_MAX_DELAY = 10.0  # ...doubling for each failure in a row, up to this
_MAX_FAILURES = 5  # failures in a row of one slot after which the parent gives up
_STEADY = 60.0  # seconds of serving after which a worker's death starts a fresh count
_PUBLISH_EVERY = 1.0  # seconds between a worker's copies of its store's figures


def _say(message: str) -> None:
    print(f"trio-gateway: {message}", file=sys.stderr, flush=True)


def _describe(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


def _exit_status(status: int) -> int:
    """A process's exit status as a shell reports it: 128 + N when signal N ended it."""
    return 128 - status if status < 0 else status


# -- the parent ---------------------------------------------------------------------


def run_workers(config_path: str, config: GatewayConfig, bind: str) -> int:
    """Serve ``config`` with ``config.workers`` worker processes on ``bind``; the exit status.

    Blocks until every worker has exited (see the module docstring). The
    workers run ``trio-gateway serve --config config_path``, so the file
    must stay readable.
    """
    settings = hypercorn_settings(config, bind)
    try:
        sockets = settings.create_sockets()
        listeners = sockets.insecure_sockets
        for sock in listeners:
            sock.listen(settings.backlog)
    except OSError as exc:
        _say(f"cannot listen on {bind}: {exc.strerror or exc}")
        return 1
    urls = " ".join(_url(sock) for sock in listeners)
    metrics_dir = tempfile.mkdtemp(prefix="trio-gateway-metrics-")
    command = [
        sys.executable,
        *("-m", "trio_gateway", "serve"),
        *("--config", os.path.abspath(config_path)),
    ]
    supervisor = _Supervisor(
        command=command,
        listener=listeners[0],
        env={**os.environ, METRICS_DIR_VARIABLE: metrics_dir},
        count=config.workers,
        announce=partial(print, f"trio-gateway listening on {urls}", file=sys.stderr, flush=True),
        metrics_dir=metrics_dir,
    )
    try:
        return trio.run(supervisor.run)
    finally:
        for sock in listeners:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


@dataclass
class _Worker:
    """One worker process and the parent's end of its control socket."""

    slot: int
    process: trio.Process
    control: trio.socket.SocketType
    ready_at: float | None = None  # trio time; None until it said it is ready

    @property
    def ready(self) -> bool:
        return self.ready_at is not None


class _Supervisor:
    """The parent's state: the live workers, the shutdown step, the exit status."""

    def __init__(
        self,
        *,
        command: list[str],
        listener: socket.socket,
        env: dict[str, str],
        count: int,
        announce: Callable[[], object],
        metrics_dir: str,
    ) -> None:
        self._command = command
        self._listener = listener
        self._env = env
        self._count = count
        self._announce = announce
        self._metrics_dir = metrics_dir
        self._live: dict[int, _Worker] = {}  # by slot, 1 to count
        self._ready_slots: set[int] = set()
        self._announced = False
        self._steps = 0  # shutdown steps taken: signals received, or 1 after a give-up
        self._stopping = trio.Event()
        self.status = 0

    async def run(self) -> int:
        """Start every worker, keep them running, return the exit status once all have exited.

        A checkpoint.
        """
        with trio.open_signal_receiver(*_SHUTDOWN_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._take_signals, signals)
                async with trio.open_nursery() as slots:
                    for slot in range(1, self._count + 1):
                        slots.start_soon(self._keep_running, slot)
                nursery.cancel_scope.cancel(reason="every worker has exited")
        return self.status

    # -- shutdown ------------------------------------------------------------------

    async def _take_signals(self, signals: AsyncIterator[int]) -> None:
        """Forward each shutdown signal to the workers; the third ends the parent. A checkpoint."""
        async for signum in signals:
            self._steps += 1
            self._stop()
            for worker in list(self._live.values()):
                # Before it is ready a worker has no handler yet: the default
                # action would end it. Only the third step wants that.
                if worker.ready or self._steps >= 3:
                    worker.process.send_signal(signum)
            if self._steps >= 3:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
                _end_process(signum)

    def _stop(self) -> None:
        """No worker starts from now on; the listening socket is the workers' alone."""
        if not self._stopping.is_set():
            self._stopping.set()
            # Once every worker has stopped accepting, the socket closes, and a
            # connection is refused at once, as with one process, rather than
            # queued for no one.
            self._listener.close()

    def _give_up(self, status: int) -> None:
        """Record a failure's exit status; shut every worker down, as a first signal does."""
        if self.status == 0:
            self.status = _exit_status(status) or 1
        if self._steps == 0:
            self._steps = 1
            self._stop()
            for worker in list(self._live.values()):
                if worker.ready:
                    worker.process.send_signal(signal.SIGTERM)

    # -- one slot ------------------------------------------------------------------

    async def _keep_running(self, slot: int) -> None:
        """Run the slot's worker, and replace it whenever it dies, until shutdown. A checkpoint."""
        failures = 0
        while not self._stopping.is_set():
            worker = await self._start(slot)
            status = await self._watch(worker)
            pid = worker.process.pid
            del self._live[slot]
            multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if self._stopping.is_set():
                if status != 0:
                    _say(f"worker {slot} (pid {pid}) {_describe(status)}")
                    self._give_up(status)
                return
            if not self._announced and not worker.ready:
                _say(f"worker {slot} (pid {pid}) {_describe(status)} before it was ready; stopping")
                self._give_up(status)
                return
            if status == 0 and worker.ready:
                delay = _FIRST_DELAY
            else:
                now = trio.current_time()
                served = 0.0 if worker.ready_at is None else now - worker.ready_at
                if served >= _STEADY:
                    failures = 0
                failures += 1
                if failures >= _MAX_FAILURES:
                    _say(
                        f"worker {slot} (pid {pid}) {_describe(status)}; "
                        f"{failures} failures in a row: stopping"
                    )
                    self._give_up(status)
                    return
                delay = min(_FIRST_DELAY * 2 ** (failures - 1), _MAX_DELAY)
            _say(f"worker {slot} (pid {pid}) {_describe(status)}; starting another in {delay:g} s")
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _start(self, slot: int) -> _Worker:
        """Start the slot's worker process. A checkpoint."""
        # A copy of its own, made now: a shutdown that closes the parent's
        # socket while the process starts (in a thread) cannot pull it away.
        listener = os.dup(self._listener.fileno())
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await trio.lowlevel.open_process(
                [*self._command, "--worker-fd", str(listener)],
                stdin=theirs.fileno(),
                pass_fds=(listener,),
                env=self._env,
                process_group=0,  # a terminal's Ctrl-C reaches the parent only
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(listener)
        worker = _Worker(slot, process, ours)
        self._live[slot] = worker
        return worker

    async def _watch(self, worker: _Worker) -> int:
        """Wait for ``worker`` to be ready, then to exit; its exit status. A checkpoint."""
        with worker.control:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wait_ready, worker)
                status = await worker.process.wait()
                nursery.cancel_scope.cancel(reason="the worker has exited")
        return status

    async def _wait_ready(self, worker: _Worker) -> None:
        """Note ``worker`` ready when it says so. A checkpoint."""
        said = b""
        while _READY not in said:
            data = await worker.control.recv(64)
            if not data:
                return
            said += data
        worker.ready_at = trio.current_time()
        self._ready_slots.add(worker.slot)
        if self._steps > 0:
            worker.process.send_signal(signal.SIGTERM)
        elif self._announced:
            _say(f"worker {worker.slot} (pid {worker.process.pid}) is serving")
        elif len(self._ready_slots) == self._count:
            self._announced = True
            self._announce()
        await trio.sleep_forever()


# -- a worker ---------------------------------------------------------------------------


async def serve_worker(gateway: Gateway, fd: int) -> None:
    """Serve ``gateway`` as one worker, on the listening socket ``fd`` its parent made.

    A checkpoint. Reports itself ready on its control socket (standard
    input), drains when the parent goes away, and, when the parent gave it a
    metrics folder, reports the whole gateway's metrics (see the module
    docstring). Returns as :func:`serve` does.
    """
    metrics_dir = os.environ.get(METRICS_DIR_VARIABLE)
    if metrics_dir is not None:
        gateway.metrics.share_across_processes(metrics_dir)
    control = trio.socket.fromfd(0, socket.AF_UNIX, socket.SOCK_STREAM)
    with control:
        async with trio.open_nursery() as nursery:

            async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve(
                    gateway,
                    f"fd://{fd}",
                    drain_trigger=partial(_parent_gone, control),
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel(reason="the worker has stopped serving")

            await nursery.start(serving)
            with contextlib.suppress(OSError):  # the parent has gone: the trigger sees it too
                await control.send(_READY)
            if metrics_dir is not None:
                nursery.start_soon(_publish_figures, gateway)
    gateway.metrics.publish_figures()  # the store's last figures, after its drain


async def _parent_gone(control: trio.socket.SocketType) -> None:
    """Return once the parent's end of the control socket is closed. A checkpoint."""
    with contextlib.suppress(OSError):
        while await control.recv(64):
            pass
    _say(f"worker pid {os.getpid()}: the parent process has gone; shutting down")


async def _publish_figures(gateway: Gateway) -> None:
    """Copy the store's figures into this worker's metrics files, every second. A checkpoint."""
    while True:
        await trio.sleep(_PUBLISH_EVERY)
        gateway.metrics.publish_figures()
