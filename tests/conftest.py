import os
import sys

import pytest
from helpers import free_port

# Quiet and deterministic: one thread keeps timings sane on the 2-core CI box.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path_factory, monkeypatch):
    """Each test gets its own agent runtime dir, so discovery never sees another test's agents."""
    d = tmp_path_factory.mktemp("rt")
    monkeypatch.setenv("VRAMTOP_RUNTIME_DIR", str(d))
    monkeypatch.delenv("VRAMTOP_RECORD", raising=False)
    monkeypatch.delenv("VRAMTOP", raising=False)
    return d


@pytest.fixture
def free_tcp_endpoint():
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: two threads on a shared 2-core box are 30x slower than one
    (contention), not faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ListSink:
    """A real sink that keeps what the agent sends (the agent's other sinks are sockets and files)."""

    def __init__(self):
        self.messages = []

    def send(self, msg):
        self.messages.append(msg)

    def close(self):
        pass

    def of(self, kind):
        return [m for m in self.messages if m["type"] == kind]


@pytest.fixture
def list_sink():
    return ListSink()


def train_steps(model, optimizer, batch, steps=2):
    for _ in range(steps):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


@pytest.fixture
def python_exe():
    return sys.executable
