"""fvpatch: save and patch residual-stream vectors in GGUF models through llama.cpp."""

__version__ = "0.1.0"

__all__ = ["Session", "Save", "Patch", "Result", "VectorFile", "load", "save", "__version__"]
_LAZY = {"Session": "session", "Save": "session", "Patch": "session", "Result": "session",
         "VectorFile": "vectorfile", "load": "vectorfile", "save": "vectorfile"}


def __getattr__(name):
    # loaded on first use, so that `fvpatch.entry` can check the thread settings before llama.cpp (and its
    # OpenMP runtime, which parses OMP_NUM_THREADS as it loads) is imported
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fvpatch.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fvpatch' has no attribute {name!r}")
