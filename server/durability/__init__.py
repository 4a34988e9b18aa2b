"""Sessions that survive restarts and crashes: the state dir (lock, snapshots), the
write-ahead log of absorbed tokens, and reading both back at start-up.

It is handed plain data (sessions, their states as bytes, records) and never calls the
engine. May import sessions and the shared modules.
"""
