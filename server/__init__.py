"""lstm-serve: the server side (model, training job, kernels, gRPC service)."""
