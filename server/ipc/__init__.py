"""Between the gRPC front end and the engine core process: the typed messages both send
(messages.py) and the framed, batched channel that carries them over a Unix socket
(channel.py). msgspec structs, encoded as MessagePack: nothing is pickled.

May import sessions (its events, GenerateSpec, Principal) and the shared modules; imported
by engine/ (the engine core process) and api/ (the front end). No torch, no grpc.
"""
