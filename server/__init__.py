"""lstm-serve: the server side, in layers; each may import only its own and those below it.

    cli.py        the `lstm-serve` entry point (serve, train, generate)
    api/          the gRPC edge: servicer, translation, Stream protocol, API keys, serve()
    engine/       engine core, scheduler and step runner, model registry, metrics
    durability/   state dir: snapshots, write-ahead log, recovery
    sessions/     sessions, jobs and their events, residency, export blobs
    kernels/      step backends (torch, triton) and the state pool they index
    *.py          shared: model, tokenizer, checkpoint, sampling, config, errors, device, generate
    training/     the training job, beside the serving layers, on the shared modules only

tests/test_layers.py fails when a module imports a higher layer, or grpc outside api/.
"""
