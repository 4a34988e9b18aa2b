"""The engine core: sessions' lifecycle, streams attached to them, restore and checkpoint
orchestration (core.py); the per-model scheduler and its step runner; the model registry;
Prometheus metrics.

No grpc here. May import durability, sessions, kernels and the shared modules; the gRPC edge
reaches it only through `Engine`'s methods.
"""
