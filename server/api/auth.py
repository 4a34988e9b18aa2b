"""API keys: who is calling, and their limits.

The keys file is YAML, a list of entries:

    - name: alice                 # owner of the sessions this key creates
      sha256: 2bd806c9...         # hex sha256 of the key; the key itself is never stored
      max_sessions: 100           # optional
      max_tokens_per_request: 2048  # optional
      max_queued_requests: 4      # optional: requests each of its sessions may have queued or running
                                  # (the lower of this and --max-queued-per-session applies)

Clients send `authorization: Bearer <key>`. The presented key is hashed and compared with
every stored hash in constant time. Without a keys file every caller is `anonymous`.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from server.errors import Unauthenticated
from server.sessions.principal import ANONYMOUS, Principal


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_sessions: int | None = Field(None, ge=1)
    max_tokens_per_request: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    def __init__(self, keys: list[ApiKey] | None = None) -> None:
        self.keys = keys  # None: no authentication

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        if path is None:
            return cls()
        entries = TypeAdapter(list[ApiKey]).validate_python(yaml.safe_load(path.read_text()) or [])
        if len({k.name for k in entries}) != len(entries):
            raise ValueError(f"{path}: key names must be unique")
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an `authorization` metadata value; UNAUTHENTICATED if none matches."""
        if self.keys is None:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        presented = hash_key(key.strip()).encode()
        match = None
        for entry in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(presented, entry.sha256.encode()):
                match = entry
        if match is None:
            raise Unauthenticated("invalid API key")
        return Principal(
            match.name, match.max_sessions, match.max_tokens_per_request, match.max_queued_requests
        )
