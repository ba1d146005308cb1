"""Offloaded layers: save and patch read and write tensors that live outside host memory.

With `n_gpu_layers`, llama.cpp computes a layer on its device (CUDA, Metal, or another machine through
ggml's RPC backend), and the graph tensors the eval callback sees sit in that device's buffers, where the
CPU cannot touch them. fvpatch reads and writes them only through ggml_backend_tensor_get/set. These tests
run the default model with every layer offloaded. They need a llama.cpp build with a device: a CUDA or
Metal build uses its GPU; a build with GGML_RPC=ON uses a ggml-rpc-server that the fixture starts on this
machine's CPU (`make test-offload` builds both and runs these). Marked `offload`; skipped elsewhere.
"""

import ctypes
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.arch_models import ARCHS, write_tiny_model
from train.stock_llama import free_port

pytestmark = pytest.mark.offload
ROOT = Path(__file__).resolve().parent.parent
RPC_SERVER = ROOT / ".llama-tools" / "bin" / "ggml-rpc-server"
SOURCE, TARGET = "Egypt -> Cairo, Norway -> Oslo, Estonia ->", "France ->"
TEXT = "Hello world -> 123, x y z!\nabc -> def; the cat sat on the mat."  # past the gemmas' 8-token window


def _libggml():
    """The registry functions in the libggml llama-cpp-python loaded (its soname: a copy loaded under another
    name would keep a registry of its own)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))
    for name, args, res in [("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p),
                            ("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
                            ("ggml_backend_register", [ctypes.c_void_p], None),
                            ("ggml_backend_dev_count", [], ctypes.c_size_t),
                            ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
                            ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
                            ("ggml_backend_buffer_is_host", [ctypes.c_void_p], ctypes.c_bool)]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@pytest.fixture(scope="session")
def device():
    """A device llama.cpp can offload to: an RPC server on this machine where the build has the RPC backend
    and the server is built, else the build's own GPU. Session-scoped: ggml cannot unregister a device,
    and every model loaded after registration lists it among its devices, so the server lives to the end."""
    import llama_cpp

    lib = _libggml()
    server = None
    if llama_cpp.llama_supports_rpc() and RPC_SERVER.exists():
        port = free_port()
        server = subprocess.Popen([RPC_SERVER, "-p", str(port), "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        rpc = lib.ggml_backend_reg_by_name(b"RPC")
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(lib.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server"))
        lib.ggml_backend_register(add_server(f"127.0.0.1:{port}".encode()))
    try:
        gpu = [1, 2]  # ggml_backend_dev_type: GPU, IGPU (an RPC device reports GPU)
        if not any(lib.ggml_backend_dev_type(lib.ggml_backend_dev_get(i)) in gpu for i in range(lib.ggml_backend_dev_count())):
            pytest.skip("llama.cpp has no device to offload to here: `make test-offload` builds one (ggml's RPC backend)")
        yield
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def sessions(device, gemma_path):
    from fvpatch import Session

    with Session(gemma_path) as cpu, Session(gemma_path, n_gpu_layers=999) as offloaded:
        yield cpu, offloaded


def test_the_tensors_fvpatch_touches_are_in_device_memory(sessions):
    from fvpatch import Session
    from fvpatch.ggml import TensorHead
    from fvpatch.session import Save

    lib, where = _libggml(), []

    class Watching(Session):
        def _on_eval(self, t, ask, user):
            if not ask:
                where.append(lib.ggml_backend_buffer_is_host(TensorHead.from_address(t).buffer))
            return super()._on_eval(t, ask, user)

    _, offloaded = sessions
    with Watching(offloaded.path, n_gpu_layers=999) as s:
        s.run(SOURCE, saves=[Save("l_out-6", (-1,)), Save("kqv_out-5", (-1,))])
    assert where == [False, False]


def test_an_added_vector_equals_llama_cpps_control_vector_offloaded(sessions):
    """A write through the callback lands where llama.cpp's own in-graph addition would, on the device."""
    from fvpatch.session import Patch

    _, s = sessions
    rng = np.random.default_rng(0)
    vectors = {3: rng.normal(0, 20, s.n_embd).astype(np.float32), 10: rng.normal(0, 20, s.n_embd).astype(np.float32)}
    patched = s.run(TARGET, patches=[Patch(f"l_out-{n}", v, -1, "add", all_tokens=True) for n, v in vectors.items()], all_logits=True)
    directions = np.zeros((s.n_layer - 1, s.n_embd), np.float32)
    for n, v in vectors.items():
        directions[n - 1] = v
    s.set_control_vector(directions)
    try:
        native = s.run(TARGET, all_logits=True)
    finally:
        s.set_control_vector(None)
    assert np.abs(native.prompt_logits - s.run(TARGET, all_logits=True).prompt_logits).max() > 1  # the vectors do something
    np.testing.assert_allclose(patched.prompt_logits, native.prompt_logits, atol=1e-3)


def test_saved_rows_are_the_cpu_sessions(sessions):
    from fvpatch.session import Save

    cpu, offloaded = sessions
    saves = [Save("l_out-6", (0, 3, -1)), Save("kqv_out-5", (-1,)), Save("attn_norm-12", (2,))]
    a, b = (s.run(SOURCE, saves=saves).saved for s in sessions)
    for name in a:  # the device's kernels differ from the CPU's in rounding, not in what they compute
        cos = (a[name] * b[name]).sum(1) / np.linalg.norm(a[name], axis=1) / np.linalg.norm(b[name], axis=1)
        assert cos.min() > 0.999, name


def test_the_seed_transfer_offloaded(sessions):
    from fvpatch.session import Patch, Save

    _, s = sessions
    v = s.run(SOURCE, saves=[Save("l_out-10", (-1,))]).saved["l_out-10"][0]
    out = s.run(TARGET, patches=[Patch("l_out-10", v, -1, "replace")], max_tokens=2)
    assert out.text.startswith(" Paris") and not s.run(TARGET, max_tokens=2).text.startswith(" Paris")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_saves_and_patches_offloaded(device, arch, tmp_path):
    """The architecture matrix's tiny f32 models (tests/arch_models.py), every layer offloaded: saved rows equal
    the CPU session's, and an added vector equals llama.cpp's in-graph control vector on the device."""
    from fvpatch import Session
    from fvpatch.session import Patch, Save

    path = write_tiny_model(arch, tmp_path / f"tiny-{arch}.gguf")
    with Session(path, exact=True) as cpu, Session(path, exact=True, n_gpu_layers=999) as s:
        n = s.n_layer // 2
        save = [Save(f"l_out-{n}", tuple(range(len(s.tokenize(TEXT)))))]
        a, b = (x.run(TEXT, saves=save).saved[f"l_out-{n}"] for x in (cpu, s))
        np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
        v = np.random.default_rng(1).normal(0, 1, s.n_embd).astype(np.float32)
        patched = s.run(TEXT, patches=[Patch(f"l_out-{n}", v, -1, "add", all_tokens=True)], all_logits=True).prompt_logits
        directions = np.zeros((s.n_layer - 1, s.n_embd), np.float32)
        directions[n - 1] = v
        s.set_control_vector(directions)
        try:
            native = s.run(TEXT, all_logits=True).prompt_logits
        finally:
            s.set_control_vector(None)
        assert np.abs(native - s.run(TEXT, all_logits=True).prompt_logits).max() > 1e-3  # the vector does something
        np.testing.assert_allclose(patched, native, atol=1e-4 * np.abs(native).max())


def test_packed_scoring_offloaded(sessions):
    """Many (prompt, answer, vector) items packed into one decode, each patched at its own rows on the device,
    score as the CPU session scores them (the bank and eval paths)."""
    from fvpatch.session import Patch

    cpu, offloaded = sessions
    prompt, answer = cpu.tokenize("Q: hot\nA:"), cpu.tokenize(" cold", add_bos=False)
    rng = np.random.default_rng(2)
    items = [(prompt, answer, [Patch("l_out-4", rng.normal(0, 30, cpu.n_embd).astype(np.float32), -1, "add", generated=True)])
             for _ in range(4)] + [(prompt, answer, [])]
    ref, got = cpu.answer_logprobs(items), offloaded.answer_logprobs(items)
    assert len({round(float(lp.sum()), 2) for lp in got}) == len(items)  # every vector really applied
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=0.01, atol=0.05)  # rounding on another device (see the saved-rows test)
