"""The other front-end processes of `--frontends K`: started, restarted if one dies, stopped.

The first front end (the process `lstm-serve serve` started) owns the engine core and the
port; these K - 1 run `python -m server.api.frontend`, connect to the engine core's socket and
listen on the same port (SO_REUSEPORT: the kernel spreads new connections over them). A front
end that dies is restarted; its streams' sessions were detached by the engine core, so their
clients resume on the next connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys

from prometheus_client import multiprocess

from server.config import ServeSettings
from server.metrics import MULTIPROCESS_DIR

log = logging.getLogger("lstm_serve")
RESTART_DELAYS = (0.2, 1.0, 5.0)  # seconds before restarting a front end that died 1, 2, 3+ times in a row


class FrontEnds:
    def __init__(self, count: int, settings: ServeSettings, engine_socket: str, port: int) -> None:
        self.count = count
        self.command = [
            sys.executable,
            "-m",
            "server.api.frontend",
            str(os.getpid()),
            engine_socket,
            str(port),
            settings.model_dump_json(),
        ]
        self.processes: list[subprocess.Popen] = []
        self._stopping = False
        self._watchers: list[asyncio.Task] = []

    def start(self) -> None:
        for index in range(self.count):
            self.processes.append(subprocess.Popen(self.command))
            self._watchers.append(asyncio.get_running_loop().create_task(self._watch(index)))

    async def _watch(self, index: int) -> None:
        """Restart front end `index` whenever it exits before the server stops."""
        failures = 0
        while True:
            process = self.processes[index]
            code = await asyncio.to_thread(process.wait)
            if MULTIPROCESS_DIR in os.environ:  # its live gauges (streams in flight) drop out
                multiprocess.mark_process_dead(process.pid)
            if self._stopping:
                return
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            log.error(
                "front end %d (pid %d) exited with code %s; restarting it in %.1fs",
                index + 1,
                process.pid,
                code,
                delay,
            )
            failures += 1
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self.processes[index] = subprocess.Popen(self.command)

    def terminate(self) -> None:
        """SIGTERM: each goes NOT_SERVING, and ends once the engine core has ended its streams."""
        self._stopping = True
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> None:
        """Wait for every one to exit; kill what is left after `timeout` seconds."""
        done, pending = await asyncio.wait(self._watchers, timeout=timeout) if self._watchers else ((), ())
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for task in pending:
            task.cancel()
