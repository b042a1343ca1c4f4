"""A real uvicorn server in a background thread on a free port of 127.0.0.1, for the serve and web-page tests."""

import socket
import threading
import time

import torch
import uvicorn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(app) as s:` serves `app` at `s.base` until the block ends."""

    def __init__(self, app):
        port = free_port()
        self.app, self.base = app, f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def tiny_checkpoints(tok, root):
    """Two tiny policies to serve: "tiny" (64 positions) and "long" (2048), same weights otherwise."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import Transformer
    from tests.conftest import tiny_config

    for name, context in (("tiny", 64), ("long", 2048)):
        torch.manual_seed(0)
        save_checkpoint(root / name, Transformer(tiny_config(tok.vocab_size, max_position_embeddings=context,
                                                             init_std=0.2)), tok)
    return root
