"""`lstm-client chat`: one session, each line fed and continued; slash commands steer it.

    /help            list the commands
    /reset           back to a new session's state (same seed)
    /fork            continue on a copy of the session (the original is kept as it is)
    /temperature T   sample the following answers at temperature T (0: greedy)
    /quit            end the chat (so does end of input)
A line that starts with `//` is fed with one slash removed.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

from client.cli_commands import EXIT_OK, UsageError, connect, print_stream, resolve_model, sampling
from client.session import Session
from client.token_stream import TokenStream

HELP = __doc__.split("\n\n", 1)[1].strip("\n")


class Chat:
    """The state a chat's commands change: the session it runs on, and the sampling options."""

    def __init__(self, session: Session, options: dict[str, Any], cleanup: contextlib.ExitStack) -> None:
        self.session, self.options, self.cleanup = session, options, cleanup

    def command(self, line: str) -> bool:
        """Run a slash command; False when the chat should end."""
        name, _, argument = line.strip().partition(" ")
        if name == "/quit":
            return False
        if name == "/help":
            say(HELP)
        elif name == "/reset":
            info = self.session.reset()
            say(f"session {info.id} reset to position {info.position}")
        elif name == "/fork":
            child = self.cleanup.enter_context(self.session.fork(keep=self.session.keep))
            self.session.detach()
            child.attach()
            self.session = child
            say(f"now on fork {child.id} (position {child.position})")
        elif name == "/temperature":
            self.options["temperature"] = temperature(argument)
            say(f"temperature {self.options['temperature']:g}")
        else:
            say(f"unknown command {name!r}; /help lists them (start a line with // to send a slash)")
        return True


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        say("usage: /temperature T, with T >= 0 (0 is greedy); unchanged")
        raise _Unchanged
    return value


class _Unchanged(Exception):
    """A command's argument was refused; the chat goes on as it was."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def chat(args: argparse.Namespace) -> int:
    if args.session and args.seed is not None:
        raise UsageError("--seed sets a new session's seed; --session continues an existing one")
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing for input())
    with connect(args) as client, contextlib.ExitStack() as cleanup:
        if args.session:
            session = client.session(args.session)
        else:
            model = resolve_model(client, args.model)
            session = client.create_session(
                model, model_version=args.model_version, seed=args.seed, keep=args.keep
            )
        cleanup.enter_context(session)
        session.attach(takeover=args.takeover)
        if session.keep:
            print(session.id, file=sys.stderr, flush=True)
        if interactive:
            say("/help lists the chat's commands")
        state = Chat(session, sampling(args), cleanup)
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            if (line := _read_line()) is None:
                break
            if line.startswith("/") and not line.startswith("//"):
                try:
                    if not state.command(line):
                        break
                except _Unchanged:
                    pass
                continue
            stream = state.session.generate(line.removeprefix("/"), **state.options)
            with _sigint_cancels(stream):  # Ctrl-C stops this answer; at the prompt, the chat
                print_stream(stream, args.json)
    return EXIT_OK


def _read_line() -> str | None:
    try:
        return input() + "\n"
    except EOFError:
        return None


@contextlib.contextmanager
def _sigint_cancels(stream: TokenStream) -> Iterator[None]:
    """While inside, the first Ctrl-C cancels `stream` (which then finishes); a second one interrupts."""

    def on_sigint(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, previous)
        stream.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
