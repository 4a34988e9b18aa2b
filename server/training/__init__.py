"""The training job: corpus, configuration, resumable training state, logs and curves, and the
loop that writes a checkpoint.

Beside the serving layers: may import only the shared modules (model, tokenizer,
checkpoint, device); only server/cli.py imports it.
"""
