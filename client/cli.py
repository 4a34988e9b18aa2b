"""`lstm-client`: generate, chat, manage sessions and benchmark an lstm-serve server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# gRPC's own log lines would break the one-line errors; read when grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from client import chat, classify_cli
from client import cli_commands as c
from client.cli_commands import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_SERVING,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)
from client.errors import LstmServeError, StatusError
from client.options import DEFAULT_TARGET

DEFAULT_TEMPERATURE = 0.8  # generate and chat: what people pick for text (bench samples at 1)
EPILOG = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_ERROR}    the call failed: the server's gRPC status on stderr, one line (e.g. "not found: ...");
       or a file could not be read or written
  {EXIT_USAGE}    usage error
  {EXIT_NOT_SERVING}    health: not serving
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_BROKEN_PIPE}  stdout closed early

environment:
  LSTM_CLIENT_TARGET    default of --target ({DEFAULT_TARGET})
  LSTM_CLIENT_API_KEY   default of --api-key
"""


def add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Connection and output options, accepted before or after the command."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    g = parser.add_argument_group("connection and output")
    g.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=default(os.environ.get("LSTM_CLIENT_TARGET", DEFAULT_TARGET)),
        help=f"server address, host:port (default: {DEFAULT_TARGET})",
    )
    g.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(os.environ.get("LSTM_CLIENT_API_KEY")),
        help="API key, sent as 'authorization: Bearer KEY'",
    )
    g.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect with TLS (system roots unless --ca-cert)",
    )
    g.add_argument(
        "--ca-cert",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="PEM CA certificate to trust (implies --tls)",
    )
    g.add_argument(
        "--tls-server-name",
        default=default(None),
        metavar="NAME",
        help="name the server's certificate must carry, if not the target's host",
    )
    g.add_argument(
        "--client-cert",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="PEM client certificate, for servers that require one (implies --tls)",
    )
    g.add_argument(
        "--client-key",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="PEM private key of --client-cert",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=default(None),
        metavar="SECONDS",
        help="deadline of each call (default: 30 for unary calls, none for streams)",
    )
    g.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON (one object per line for streams)",
    )


def add_sampling_options(
    p: argparse.ArgumentParser, max_tokens: int, temperature: float | None = None
) -> None:
    p.add_argument("--model", metavar="NAME", help="model name (default: the only one served, or 'default')")
    p.add_argument(
        "--model-version", default="", metavar="VERSION", help="model version (default: the newest loaded)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        default=max_tokens,
        help="tokens to generate (0: the server's limit; default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        metavar="T",
        help=f"sampling temperature; 0 is greedy (default: {1 if temperature is None else temperature:g})",
    )
    p.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (0: off)"
    )
    p.add_argument(
        "--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1] (default: 1, off)"
    )
    p.add_argument("--seed", type=int, metavar="N", help="a new session's sampling seed (default: random)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop once the text ends with TEXT (repeatable)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate past <eos> (absorbed like any token) up to --max-tokens or a --stop",
    )
    p.add_argument(
        "--stream-interval",
        type=stream_interval,
        default=1,
        metavar="N",
        help="generated tokens per message from the server: fewer messages, each token arriving with"
        " its message (default: %(default)s, each in its own)",
    )


def stream_interval(text: str) -> int:
    """--stream-interval's value: a uint32 (0 counts as 1)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens per message, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, defaults=False)
    parser = argparse.ArgumentParser(
        prog="lstm-client",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help, description=help, parents=[common])

    p = command(commands, "generate", "stream generated text to stdout as tokens arrive")
    p.add_argument(
        "prompt", nargs="?", default="", metavar="PROMPT", help="text fed before generating ('-': read stdin)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--session", metavar="ID", help="continue this session (default: a temporary one)")
    which.add_argument(
        "--new-session", action="store_true", help="create a session, keep it and print its id on stderr"
    )
    p.add_argument("--takeover", action="store_true", help="take the session over from a stream driving it")
    p.add_argument(
        "--retry-deadline",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with a session: how long to keep resuming after a server or replica goes away (default: 30)",
    )
    add_sampling_options(p, max_tokens=200, temperature=DEFAULT_TEMPERATURE)
    p.set_defaults(run=c.generate)

    p = command(
        commands,
        "chat",
        "interactive loop on one session: each line is fed and the model continues (/help: its commands)",
    )
    p.add_argument("--session", metavar="ID", help="chat on this session (default: a new one)")
    p.add_argument("--keep", action="store_true", help="keep the new session and print its id on stderr")
    p.add_argument("--takeover", action="store_true", help="take the session over from a stream driving it")
    add_sampling_options(p, max_tokens=200, temperature=DEFAULT_TEMPERATURE)
    p.set_defaults(run=chat.chat)

    sessions = command(commands, "sessions", "manage sessions").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = command(sessions, "create", "create a session; prints its id")
    p.add_argument("--model", metavar="NAME", help="model name (default: the only one served, or 'default')")
    p.add_argument("--model-version", default="", metavar="VERSION")
    p.add_argument("--seed", type=int, metavar="N", help="sampling seed (default: random)")
    p.add_argument(
        "--ttl", type=float, metavar="SECONDS", help="idle time before it expires (default: the server's)"
    )
    p.set_defaults(run=c.sessions_create)
    command(sessions, "list", "list your sessions").set_defaults(run=c.sessions_list)
    for name, help, run in (
        ("show", "show a session", c.sessions_show),
        ("reset", "reset a session to position 1", c.sessions_reset),
    ):
        p = command(sessions, name, help)
        p.add_argument("session_id", metavar="ID")
        p.set_defaults(run=run)
    p = command(sessions, "delete", "delete sessions")
    p.add_argument("session_ids", nargs="+", metavar="ID")
    p.set_defaults(run=c.sessions_delete)
    p = command(sessions, "fork", "copy a session into a new one; prints its id")
    p.add_argument("session_id", metavar="ID")
    p.add_argument("--seed", type=int, metavar="N", help="the fork's seed (default: the parent's)")
    p.add_argument("--ttl", type=float, metavar="SECONDS")
    p.set_defaults(run=c.sessions_fork)
    p = command(sessions, "export", "write a session to FILE as a self-checking blob")
    p.add_argument("session_id", metavar="ID")
    p.add_argument("file", metavar="FILE", help="'-': stdout")
    p.set_defaults(run=c.sessions_export)
    p = command(sessions, "import", "create a session from an exported FILE; prints its id")
    p.add_argument("file", metavar="FILE", help="'-': stdin")
    p.add_argument("--ttl", type=float, metavar="SECONDS")
    p.set_defaults(run=c.sessions_import)

    classify_cli.add_parser(command, commands)
    command(commands, "models", "list the models served").set_defaults(run=c.models)
    p = command(commands, "health", f"check the server's health (exit {EXIT_NOT_SERVING} if not serving)")
    p.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    p.set_defaults(run=c.health)

    p = command(commands, "bench", "load test: concurrent sessions streaming generation")
    p.add_argument(
        "--sessions", type=int, default=8, metavar="N", help="concurrent sessions (default: %(default)s)"
    )
    p.add_argument(
        "--duration", type=float, metavar="SECONDS", help="how long to run (default: 10 unless --tokens)"
    )
    p.add_argument("--tokens", type=int, metavar="N", help="stop after N generated tokens in all")
    p.add_argument(
        "--connections",
        type=int,
        metavar="N",
        help="connections the sessions are spread over, to reach every front-end process "
        "(default: one per session, at most 16)",
    )
    p.add_argument("--prompt", default="", help="text fed before each generation request")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_sampling_options(p, max_tokens=64)
    p.set_defaults(run=c.bench)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a console without UTF-8 still gets the text
    try:
        return args.run(args)
    except StatusError as e:
        details = _one_line(e.details)
        print(f"lstm-client: {e.words}{': ' + details if details else ''}", file=sys.stderr)
        return EXIT_ERROR
    except UsageError as e:
        print(f"lstm-client: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    except (LstmServeError, OSError) as e:
        print(f"lstm-client: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
