"""`fvpatch serve`: an OpenAI-compatible local server that takes vectors per request."""

import click

from fvpatch.cli import FiniteFloat, main, model_options, open_session


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (another than localhost exposes the model to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--parallel", "-np", type=click.IntRange(1, 32), default=1, show_default=True,
              help="Requests decoded together, each in its own sequence with its own vectors, sharing --n-ctx. More "
                   "throughput under concurrent load on bigger models; a batch moves logits a little, so greedy text "
                   "then depends on what else is in flight. 1: requests take turns and reproduce `fvpatch patch`.")
@click.option("--vector", "vectors", multiple=True, metavar="NAME|FILE",
              help="A vector for every request that names none of its own (for clients that cannot add fields), at the "
                   "positions its file says; a request's own \"vectors\" replace these, and [] asks for none. Repeatable.")
@click.option("--scale", "scales", type=FiniteFloat(), multiple=True, help="Scale of each --vector, in order (default: each file's own).")
@click.option("--vector-dir", type=click.Path(exists=True, file_okay=False), default=".", show_default=True,
              help="The folder whose files requests may name as vectors (besides shipped vectors); no other file on this "
                   "machine can be read, or probed, by a client.")
def serve(model, n_ctx, n_gpu_layers, host, port, parallel, vectors, scales, vector_dir):
    """Serve the model on /v1/completions and /v1/chat/completions (OpenAI's API, streaming too), where
    each request may add vectors: "vectors": [{"vector": NAME_OR_FILE, "scale": 1.0, "positions": "last"}].

    positions: "last" (the last prompt token and every generated one, as function vectors are applied),
    "all" (every token, as a llama.cpp control vector), or a list of prompt token indices. One model is
    loaded; requests take turns on it, or up to --parallel of them are decoded together, each with only
    its own vectors. Log-probabilities (logprobs, echo, streamed too) and vLLM's /tokenize, /detokenize and
    /tokenizer_info let lm-evaluation-harness score a vector through it (examples/lm_eval). A request
    names shipped vectors or files inside --vector-dir; OpenAI fields it does not implement (penalties,
    logit_bias, best_of, suffix, tools) are a 400, never silently ignored.

    \b
    Example:
      fvpatch serve --port 8080
      curl -s localhost:8080/v1/completions -d '{"prompt": "Q: hot\\nA:", "max_tokens": 3,
           "vectors": [{"vector": "antonym.ffv"}]}'
      fvpatch serve --vector antonym.ffv     # for any OpenAI client, unchanged
    """
    from fvpatch.models import short_name
    from fvpatch.server import make_server

    if scales and len(scales) != len(vectors):
        raise click.UsageError(f"give one --scale per --vector ({len(vectors)}), or none")
    default = [{"vector": v} | ({"scale": scales[i]} if scales else {}) for i, v in enumerate(vectors)]
    with open_session(model, n_ctx, n_gpu_layers) as s:
        server = make_server(s, host, port, short_name(s.path), parallel=parallel, vectors=default, vector_dir=vector_dir)
        with_vectors = f", with {', '.join(vectors)} unless a request names its own" if vectors else ""
        click.echo(f"fvpatch serving {s.path.name} on http://{host}:{server.server_address[1]}/v1{with_vectors} (Ctrl-C stops)", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
