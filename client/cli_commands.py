"""What each `lstm-client` command does (the parser lives in `client.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from client.bench import BenchConfig, report, run_bench
from client.messages import SessionInfo
from client.options import ClientOptions
from client.render import (
    key_values,
    model_dict,
    models_table,
    session_dict,
    sessions_table,
)
from client.resuming import Printer, generate_resuming
from client.sync_client import Client
from client.token_stream import TokenStream

EXIT_OK = 0
EXIT_ERROR = 1  # the server answered with an error status, or a local file could not be used
EXIT_USAGE = 2
EXIT_NOT_SERVING = 3  # `health`: the server (or the service asked about) is not serving
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # stdout was closed early (e.g. `| head`)


class UsageError(Exception):
    """Arguments that parse but do not make sense together."""


def client_options(args: argparse.Namespace) -> ClientOptions:
    fields: dict[str, object] = {
        "api_key": args.api_key,
        "tls": args.tls,
        "tls_server_name": args.tls_server_name,
    }
    for name in ("ca_cert", "client_cert", "client_key"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name).read_bytes()
    if (args.client_cert is None) != (args.client_key is None):
        raise UsageError("--client-cert and --client-key go together")
    if args.timeout is not None:
        fields.update(timeout=args.timeout, stream_timeout=args.timeout)
    return ClientOptions(**fields)  # type: ignore[arg-type]


def connect(args: argparse.Namespace) -> Client:
    return Client(args.target, client_options(args))


def emit(obj: Any) -> None:
    """One JSON document on one line."""
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def resolve_model(client: Client, requested: str | None) -> str:
    """The model asked for, else the only one served, else 'default'."""
    if requested:
        return requested
    names = sorted({m.name for m in client.list_models()})
    if len(names) == 1:
        return names[0]
    if "default" in names:
        return "default"
    raise UsageError(f"choose a model with --model: {', '.join(names) or 'none is loaded'}")


def print_stream(stream: TokenStream, as_json: bool) -> None:
    """Each piece of text as it arrives (flushed), then a newline if the text lacks one."""
    printer = Printer(as_json)
    printer.stream(stream)
    printer.end(stream)


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "stream_interval": args.stream_interval,
    }


def generate(args: argparse.Namespace) -> int:
    if args.session and args.seed is not None:
        raise UsageError("--seed sets a new session's seed; --session continues an existing one")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with connect(args) as client:
        session_id, model = args.session or "", ""
        if not session_id:
            model = resolve_model(client, args.model)
        if args.new_session:
            session_id = client.create_session(
                model, model_version=args.model_version, seed=args.seed, keep=True
            ).id
            print(session_id, file=sys.stderr, flush=True)
        if session_id:  # a session can be resumed: a fault costs a retry, not the generation
            handle = client.session(session_id)
            printer = Printer(args.json)
            generate_resuming(handle, prompt, sampling(args), printer, args.retry_deadline, args.takeover)
            return EXIT_OK
        stream = client.generate(  # a temporary session: nothing to resume
            prompt, model=model, model_version=args.model_version, seed=args.seed, **sampling(args)
        )
        print_stream(stream, args.json)
    return EXIT_OK


def _print_session(info: SessionInfo, as_json: bool, *, id_only: bool) -> None:
    if as_json:
        emit(session_dict(info))
    else:
        print(info.id if id_only else key_values(session_dict(info)))


def sessions_create(args: argparse.Namespace) -> int:
    with connect(args) as client:
        model = resolve_model(client, args.model)
        session = client.create_session(
            model, model_version=args.model_version, seed=args.seed, ttl=args.ttl, keep=True
        )
    assert session.info is not None
    _print_session(session.info, args.json, id_only=True)
    return EXIT_OK


def sessions_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        sessions = client.list_sessions()
    if args.json:
        emit([session_dict(s) for s in sessions])
    else:
        print(sessions_table(sessions))
    return EXIT_OK


def sessions_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        _print_session(client.get_session(args.session_id), args.json, id_only=False)
    return EXIT_OK


def sessions_reset(args: argparse.Namespace) -> int:
    with connect(args) as client:
        _print_session(client.reset_session(args.session_id), args.json, id_only=False)
    return EXIT_OK


def sessions_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for session_id in args.session_ids:
            client.delete_session(session_id)
    return EXIT_OK


def sessions_fork(args: argparse.Namespace) -> int:
    with connect(args) as client:
        fork = client.fork_session(args.session_id, seed=args.seed, ttl=args.ttl, keep=True)
    assert fork.info is not None
    _print_session(fork.info, args.json, id_only=True)
    return EXIT_OK


def sessions_export(args: argparse.Namespace) -> int:
    with connect(args) as client:
        blob = client.export_session(args.session_id)
    if args.file == "-":
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
    else:
        Path(args.file).write_bytes(blob)
    return EXIT_OK


def sessions_import(args: argparse.Namespace) -> int:
    blob = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    with connect(args) as client:
        session = client.import_session(blob, ttl=args.ttl, keep=True)
    assert session.info is not None
    _print_session(session.info, args.json, id_only=True)
    return EXIT_OK


def models(args: argparse.Namespace) -> int:
    with connect(args) as client:
        served = client.list_models()
    if args.json:
        emit([model_dict(m) for m in served])
    else:
        print(models_table(served))
    return EXIT_OK


def health(args: argparse.Namespace) -> int:
    with connect(args) as client:
        status = client.health(args.service)
    if args.json:
        emit({"status": status})
    else:
        print(status)
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING


def bench(args: argparse.Namespace) -> int:
    """Exit 0 once the load ran with at least one request done (errors are in the report)."""
    if args.sessions < 1 or args.max_tokens < 1:
        raise UsageError("bench needs --sessions and --max-tokens of at least 1")
    options = client_options(args)
    with Client(args.target, options) as client:
        model = resolve_model(client, args.model)
    config = BenchConfig(
        model=model,
        sessions=args.sessions,
        duration=args.duration,
        tokens=args.tokens,
        max_tokens=args.max_tokens,
        prompt=args.prompt,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stream_interval=args.stream_interval,
        connections=args.connections,
        progress=args.progress,
    )
    result = asyncio.run(run_bench(args.target, options, config))
    if args.json:
        emit(result.to_dict())
    else:
        print(report(result))
    return EXIT_OK if result.requests else EXIT_ERROR
