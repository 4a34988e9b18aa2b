"""`lstm-client generate --session ID` through faults: a replica that dies mid-stream (behind a
router) or a server that restarts costs the command a `resume()`, not the generation.

After a retriable status (client/retry.py) it resumes the session (jittered retries within a
deadline), then goes on from where the session is: the rest of the prompt if the server never
absorbed all of it, then the rest of the tokens asked for. Tokens the server generated but this
command never received (`missed`) are printed like the others, so the output is what an
uninterrupted run prints. A temporary session (no --session) cannot be resumed: there the
first fault ends the command.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from client import retry
from client.errors import StatusError
from client.messages import Prompt
from client.render import finished_dict, token_dict
from client.session import Session
from client.token_stream import TokenStream


class Printer:
    """Text as it arrives (flushed), or one JSON object per token and a last one at the end."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.last = ""  # the last character written (text mode)

    def _text(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.last = text[-1]

    def _emit(self, obj: Any) -> None:
        print(json.dumps(obj, ensure_ascii=False), flush=True)

    def stream(self, stream: TokenStream) -> None:
        for token in stream:
            if self.as_json:
                self._emit({"token": token_dict(token)})
            else:
                self._text(token.text)

    def missed(self, ids: list[int], position: int) -> None:
        """Tokens absorbed after `position` that never arrived (byte tokens: the server's text is their UTF-8)."""
        if self.as_json:
            for i, token_id in enumerate(ids, 1):
                self._emit({"token": {"id": token_id, "position": position + i, "missed": True}})
        else:
            self._text(bytes(t for t in ids if t < 256).decode("utf-8", "replace"))

    def end(self, stream: TokenStream) -> None:
        if self.as_json:
            finished = finished_dict(stream.finished) if stream.finished else None
            self._emit({"finished": finished, "session_id": stream.session_id})
        elif self.last != "\n":
            self._text("\n")


def generate_resuming(
    handle: Session, prompt: str, options: dict[str, Any], printer: Printer, deadline: float, takeover: bool
) -> None:
    """Feed `prompt` and generate options["max_tokens"] tokens on the session, resuming after faults."""
    wanted = options.pop("max_tokens")
    start = handle.attach(takeover=takeover).position
    prompt_ids = list(prompt.encode("utf-8"))
    generated_from = start + len(prompt_ids)  # positions after this one are generated tokens
    pending: Prompt = prompt
    generated = 0
    while True:
        stream = handle.generate(pending, max_tokens=max(1, wanted - generated) if wanted else 0, **options)
        try:
            printer.stream(stream)
            printer.end(stream)
            return
        except StatusError as e:
            if not retry.retriable(e):
                raise
            result = handle.resume(deadline=deadline)
            print(
                f"lstm-client: {e.code.name} ({e.details}); resumed session {handle.id} at position {result.position}",
                file=sys.stderr,
                flush=True,
            )
        absorbed = result.position - start
        pending = prompt_ids[absorbed:] if absorbed < len(prompt_ids) else ""
        first_missed = result.position - len(result.missed)
        new = [t for i, t in enumerate(result.missed, first_missed + 1) if i > generated_from]
        printer.missed(new, result.position - len(new))
        generated = max(0, result.position - generated_from)
        if wanted and generated >= wanted:
            printer.end(stream)
            return
