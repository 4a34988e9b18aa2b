"""The gRPC edge: the servicer, request/response translation, the Stream protocol, API keys
and `serve()` (ports, health, reflection, shutdown).

Owns everything that knows about grpc and the generated protobuf messages; nothing else in
server/ imports them. It translates requests into engine calls and engine errors into status
codes. May import the engine and every layer below it (tests/test_layers.py checks).
"""
