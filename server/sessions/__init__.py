"""The state of sessions: the session store and its per-owner limits, jobs and the events
they deliver through outboxes, where each session's recurrent state lives (device slot or
host memory), and the export blob format.

May import kernels (the state pool) and the shared modules.
"""
