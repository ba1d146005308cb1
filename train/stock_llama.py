"""Stock llama.cpp's server (built by `make llama-tools`) with a control vector, asked for next-token
log-probabilities: how a user of plain llama.cpp sees a vector that `fvpatch export` wrote."""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from fvpatch.errors import FvpatchError

TOOLS = Path(os.environ.get("FVPATCH_LLAMA_TOOLS", Path(__file__).resolve().parent.parent / ".llama-tools" / "bin"))


def free_port() -> int:
    """A local TCP port nothing listens on now (the OS picks it; another process could still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`llama-server -m MODEL [--control-vector FILE] EXTRA...` on a free local port, one thread, `parallel` slots."""

    def __init__(self, model: Path, control_vector: Path | None = None, extra: list[str] = (), n_ctx: int = 512, parallel: int = 1):
        if not (TOOLS / "llama-server").exists():
            raise FvpatchError(f"no llama-server in {TOOLS}: run `make llama-tools` (or set FVPATCH_LLAMA_TOOLS)")
        port = free_port()
        args = [TOOLS / "llama-server", "-m", model, "--port", str(port), "-t", "1", "-np", str(parallel), "-c", str(n_ctx), "--no-webui", *extra]
        if control_vector is not None:
            args += ["--control-vector", control_vector]
        self.url = f"http://127.0.0.1:{port}"
        # the server logs every request; to a pipe nobody reads while it runs, that would fill and stall it
        self._log = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=self._log, text=True)
        for _ in range(240):
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"llama-server exited: {self._log.read()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("llama-server did not become ready in 120 s")

    def top(self, tokens: list[int], n: int = 5) -> list[tuple[int, float]]:
        """The `n` most likely next tokens after `tokens` and their log-probabilities (the server's own softmax of
        the logits, before any sampler); the prompt's cache is not reused, so each answer stands alone."""
        body = json.dumps({"prompt": tokens, "n_predict": 1, "n_probs": n, "temperature": 0, "cache_prompt": False}).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url + "/completion", body), timeout=300) as r:
            top = json.load(r)["completion_probabilities"][0]["top_logprobs"]
        return [(t["id"], t["logprob"]) for t in top]

    def close(self):
        self._proc.terminate()
        self._proc.wait(timeout=30)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
