"""The transport's limit: a bare grpc.aio bidirectional stream with no model behind it.

    python bench/echo.py server --port 0            # prints "listening on 127.0.0.1:PORT"
    python bench/echo.py client --target HOST:PORT --sessions 64 --duration 10 --max-tokens 64 [--connections 16]

The server speaks lstm-serve's own messages: for each `generate` request on a Stream it
answers `max_tokens` token events and a finished event at once, the same sizes and
serialization as the real service, with nothing else to do. The client runs N concurrent
streams doing exactly that and reports tokens/s as JSON. Two processes, as in the real
benchmark, so the pair measures what grpc.aio itself costs on this machine.

`server --paced` delivers tokens as a serving front end must: an iteration gives one token to
every stream waiting for one, through that stream's queue, as a scheduler iteration steps every
ready row (an engine that costs nothing, one frame per iteration).
Each message then costs a wake-up of its stream's task besides grpc's own work, and writes
no longer follow each other on one stream: bench/serving_gap.py compares the two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client.lstmserve.v1 import lstm_serve_pb2 as pb  # noqa: E402
from client.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc  # noqa: E402


class Pacer:
    """A free engine: each iteration puts one token in the queue of every stream waiting for one."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Queue] = []  # streams that want a token this iteration
        self.taken = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.run())  # held: the loop keeps weak refs

    def want(self, queue: asyncio.Queue) -> None:
        self.waiting.append(queue)
        self.taken.set()

    async def run(self) -> None:
        while True:
            await self.taken.wait()
            self.taken.clear()
            await asyncio.sleep(0)  # let the other streams ask for this iteration's token
            rows, self.waiting = self.waiting, []
            for queue in rows:
                queue.put_nowait(None)


class EchoServicer(pb_grpc.LstmServeServiceServicer):
    def __init__(self, pacer: Pacer | None) -> None:
        self.pacer = pacer

    async def Stream(self, requests, context):
        queue: asyncio.Queue = asyncio.Queue()
        position = 1
        async for request in requests:
            kind = request.WhichOneof("kind")
            if kind == "open":
                yield pb.StreamResponse(
                    request_id=request.request_id, opened=pb.Session(id="e" * 32, position=position)
                )
            elif kind == "generate":
                for _ in range(request.generate.max_tokens):
                    if self.pacer is not None:
                        self.pacer.want(queue)
                        await queue.get()
                    position += 1
                    token = pb.Token(id=101, text="e", logprob=-1.2345678, position=position)
                    yield pb.StreamResponse(request_id=request.request_id, token=token)
                finished = pb.Finished(
                    reason=pb.FINISH_REASON_LENGTH,
                    generated_tokens=request.generate.max_tokens,
                    position=position,
                )
                yield pb.StreamResponse(request_id=request.request_id, finished=finished)


async def serve(port: int, paced: bool) -> None:
    server = grpc.aio.server()
    pacer = Pacer() if paced else None
    pb_grpc.add_LstmServeServiceServicer_to_server(EchoServicer(pacer), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


async def stream_worker(stub, deadline: float, max_tokens: int, counts: list[int]) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    await queue.put(pb.StreamRequest(request_id="open", open=pb.OpenStream(session_id="e" * 32)))

    async def requests():
        while (request := await queue.get()) is not None:
            yield request

    call = stub.Stream(requests())
    await call.read()  # opened
    n = 0
    while time.perf_counter() < deadline:
        n += 1
        await queue.put(
            pb.StreamRequest(request_id=str(n), generate=pb.GenerateTokensRequest(max_tokens=max_tokens))
        )
        while True:
            response = await call.read()
            if response.HasField("finished"):
                break
            counts[0] += 1
    await queue.put(None)
    call.cancel()


async def load(target: str, sessions: int, duration: float, max_tokens: int, connections: int) -> dict:
    """`sessions` streams over `connections` HTTP/2 connections (round robin), as `lstm-client
    bench --connections` spreads them: per-message costs depend on how many share one."""
    own = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    channels = [grpc.aio.insecure_channel(target, options=own) for _ in range(connections)]
    stubs = [pb_grpc.LstmServeServiceStub(channel) for channel in channels]
    counts = [0]
    start = time.perf_counter()
    try:
        await asyncio.gather(
            *(
                stream_worker(stubs[i % connections], start + duration, max_tokens, counts)
                for i in range(sessions)
            )
        )
        elapsed = time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()
    return {
        "sessions": sessions,
        "connections": connections,
        "duration_s": elapsed,
        "tokens": counts[0],
        "tokens_per_s": counts[0] / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    s = modes.add_parser("server")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--paced", action="store_true", help="one token per stream per iteration, through queues")
    c = modes.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--sessions", type=int, default=64)
    c.add_argument("--duration", type=float, default=10.0)
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument(
        "--connections", type=int, default=1, help="HTTP/2 connections the streams are spread over"
    )
    args = parser.parse_args()
    if args.mode == "server":
        asyncio.run(serve(args.port, args.paced))
    else:
        print(
            json.dumps(
                asyncio.run(
                    load(args.target, args.sessions, args.duration, args.max_tokens, args.connections)
                )
            )
        )


if __name__ == "__main__":
    main()
