"""Function vectors by causal mediation (train/cma.py) and task vectors (train/taskvec.py), on the tiny model."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from train.cma import head_effects, head_effects_unbatched, head_map, mean_head_outputs

BOS = 1
WORDS = list(range(300, 340))  # plain vocabulary pieces of the tiny SPM model
MARK, ANSWER = 400, 420


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.choice(WORDS, size=int(rng.integers(5, 14))).tolist()] for _ in range(n)]


def test_batched_head_effects_equal_the_one_head_per_forward_definition(tiny_lm):
    clean, corrupted = random_prompts(6, 0), random_prompts(3, 1)
    answers = [ANSWER, 350, 333]
    mean_heads, _ = mean_head_outputs(tiny_lm, clean, batch_size=4)
    ref_patched, ref_base = head_effects_unbatched(tiny_lm, corrupted, answers, mean_heads)
    # a batch size that does not divide the 1 + 16 rows, so several chunks share one cached prefix
    patched, base = head_effects(tiny_lm, corrupted, answers, mean_heads, batch_size=5)
    torch.testing.assert_close(base, ref_base, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(patched, ref_patched, rtol=1e-5, atol=1e-9)
    effects = patched - base[:, None, None]
    torch.testing.assert_close(effects, ref_patched - ref_base[:, None, None], rtol=1e-4, atol=1e-8)
    assert effects.abs().max() > 1e-4  # heads do move the answer's probability: the comparison is not vacuous


def plant_head(lm, layer: int, head: int, strength: float = 60.0):
    """A copy of `lm` in which head (layer, head) alone carries the task "the answer is ANSWER when MARK is in the prompt".

    Its query is zeroed, so it attends evenly to all tokens; its value reads the embedding direction of
    MARK (orthogonal to the other tokens' embeddings); its slice of o_proj writes that amount along the
    direction the final norm and unembedding turn into ANSWER's logit.
    """
    lm = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    m = lm.model
    emb = m.model.embed_tokens.weight
    others = emb[WORDS + [BOS]].T  # (d, n)
    q, _ = torch.linalg.qr(others)
    mark = emb[MARK] - q @ (q.T @ emb[MARK])  # MARK's embedding with the other tokens' span removed
    emb[MARK] = mark * (emb[MARK].norm() / mark.norm())
    u = emb[MARK] / emb[MARK].norm()

    attn = m.model.layers[layer].self_attn
    g = m.model.layers[layer].input_layernorm.weight
    hd = lm.head_dim
    kv = head // (lm.n_head // m.config.num_key_value_heads)
    attn.q_proj.weight[head * hd : (head + 1) * hd] = 0
    attn.v_proj.weight[kv * hd : (kv + 1) * hd] = (u / g)[None, :].expand(hd, -1)
    target = m.lm_head.weight[ANSWER] / m.model.norm.weight
    attn.o_proj.weight[:, head * hd : (head + 1) * hd] = strength * (target / target.norm())[:, None].expand(-1, hd) / hd
    return lm


def test_planted_head_is_the_top_head(tiny_lm):
    layer, head = 2, 1
    lm = plant_head(tiny_lm, layer, head)
    rng = np.random.default_rng(2)
    corrupted = random_prompts(8, 3)
    clean = []
    for p in random_prompts(8, 4):
        p = list(p)
        for i in rng.choice(range(1, len(p)), size=len(p) // 2, replace=False):
            p[i] = MARK
        clean.append(p)
    answers = [ANSWER] * len(corrupted)
    hm = head_map(lm, clean, corrupted, answers)
    assert hm.top(1) == [(layer, head)]
    others = hm.aie.flatten().sort(descending=True).values
    assert others[0] > 0.3 and others[0] > 5 * others[1].abs()
    # and in the unmodified model no head stands out this way at that spot
    assert hm.base_prob < 0.2
    plain = head_map(tiny_lm, clean, corrupted, answers)
    assert plain.aie[layer, head] < 0.05


def test_function_vector_is_the_sum_of_head_outputs_through_o_proj(tiny_lm):
    from train.cma import function_vector
    from train.hooks import head_to_residual

    hm = head_map(tiny_lm, random_prompts(4, 5), random_prompts(2, 6), [ANSWER, ANSWER])
    heads = hm.top(3)
    expected = sum(head_to_residual(tiny_lm.model, L, h, hm.mean_heads[L, h]) for L, h in heads)
    torch.testing.assert_close(function_vector(tiny_lm, hm, heads), expected)  # llama: no post-attention norm


def test_head_map_and_function_vector_of_a_bfloat16_model_are_float32_and_match(tiny_lm):
    from train.cma import function_vector

    layer, head = 2, 1
    planted = plant_head(tiny_lm, layer, head)
    low = dataclasses.replace(planted, model=copy.deepcopy(planted.model).to(torch.bfloat16), dtype=torch.bfloat16)  # as load_model(dtype=) rounds
    clean, corrupted = random_prompts(6, 4), random_prompts(3, 3)
    for p in clean:
        p[1::2] = [MARK] * len(p[1::2])
    maps = [head_map(lm, clean, corrupted, [ANSWER] * 3) for lm in (planted, low)]
    assert maps[1].mean_heads.dtype == maps[1].attn_rms.dtype == torch.float32
    assert maps[1].top(1) == maps[0].top(1) == [(layer, head)]
    torch.testing.assert_close(maps[1].mean_heads, maps[0].mean_heads, rtol=0.05, atol=0.05)
    vectors = [function_vector(lm, hm, hm.top(3)) for lm, hm in zip((planted, low), maps)]
    assert vectors[1].dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(vectors[0], vectors[1], 0) > 0.99


@pytest.mark.slow
def test_function_vector_on_gemma_goes_through_the_post_attention_norm(gemma_lm):
    """Gemma 3 normalizes the attention output before the residual add: the heads' shares must add up to it."""
    from train.cma import HeadMap, function_vector, post_attention_norm
    from train.hooks import record_heads

    tokens = gemma_lm.tokenize("Q: hot\nA: cold\n\nQ: big\nA:")
    mean_heads, attn_rms = mean_head_outputs(gemma_lm, [tokens])
    hm = HeadMap(torch.zeros(gemma_lm.n_layer, gemma_lm.n_head), mean_heads, attn_rms, 0.0)
    L = 5
    with record_heads(gemma_lm.model, [L]) as heads:
        gemma_lm.model.model(input_ids=torch.tensor([tokens]))
    attn_out = gemma_lm.model.model.layers[L].self_attn.o_proj(heads[L][0, -1].flatten())
    added = post_attention_norm(gemma_lm, L)(attn_out)  # what block L's attention adds to the residual
    fv = function_vector(gemma_lm, hm, [(L, h) for h in range(gemma_lm.n_head)])
    torch.testing.assert_close(fv, added, rtol=1e-3, atol=1e-3 * float(added.abs().max()))


def test_cli_trains_vectors_and_both_engines_score_them_alike(tiny_gguf, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from fvpatch import vectorfile
    from fvpatch.cli import main

    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "models"))  # the tiny model's torch copy stays out of models/
    pairs = tmp_path / "next-letter.jsonl"
    pairs.write_text("".join(json.dumps({"input": a + b, "output": chr(ord(b) + 1)}) + "\n" for a in "abcde" for b in "pqrstuvw"))
    common = ["--task", str(pairs), "--model", str(tiny_gguf), "--k", "3"]
    run = CliRunner().invoke
    for method, extra in (("cma", ["--heads", "2"]), ("taskvec", [])):
        out = tmp_path / f"v.{method}.safetensors"
        r = run(main, ["train", "fv", *common, "--method", method, "--layer", "1", "--n-prompts", "4", "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        vf = vectorfile.load(out)
        assert vf.tensor == "l_out-1" and vf.mode == ("add" if method == "cma" else "replace")
        assert vf.meta["fvpatch.task"] == "next-letter" and vf.meta["fvpatch.k"] == "3"
        assert vf.meta["fvpatch.dataset"] == f"{pairs}, split seed 0" and vf.meta["fvpatch.template"] == "Q: {x}\nA: {y}\n\n"
        assert vf.meta["fvpatch.train_dtype"] == "float32"
        assert vf.model["vocab"] and vf.model["file"] == tiny_gguf.name

        result = tmp_path / f"{method}.json"
        r = run(main, ["eval", "task", *common, "--vector", str(out), "--engine", "both", "--n", "6", "-o", str(result)])
        assert r.exit_code == 0, r.output
        res = json.loads(result.read_text())["results"]
        assert set(res) == {"llama.cpp", "torch"}
        assert res["llama.cpp"]["correct"] == res["torch"]["correct"]
        assert "| zero_shot+vector |" in r.output
        paired = res["llama.cpp"]["vector_vs_icl"]  # whether the vector and ICL differ at all on these items
        assert paired["ffv"] == sum(res["llama.cpp"]["correct"]["zero_shot+vector"]) and paired["n"] == 6
        assert "llama.cpp: zero-shot + vector − ICL = " in r.output and "sign test p = " in r.output
    r = run(main, ["train", "fv", *common, "--out", str(tmp_path / "v.cma.safetensors")])
    assert r.exit_code != 0 and "exists; pass --force" in r.output


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_engines_apply_a_vector_file_alike(tiny_session, tiny_lm, mode):
    """The same vector file at the last token moves llama.cpp's and PyTorch's logits the same way (f32 tiny model)."""
    from fvpatch.evaluate import patch_of
    from fvpatch.vectorfile import VectorFile
    from train.evaluate import last_logits, vector_tensor
    from train.hooks import patch_residual

    prompts = random_prompts(5, 7)
    vector = np.random.default_rng(8).standard_normal(tiny_lm.n_embd).astype(np.float32) * 4
    vf = VectorFile("l_out-1", vector, [-1], tiny_session.fingerprint(), mode=mode)
    ours = np.stack([tiny_session.run(p, patches=[patch_of(vf)]).logits for p in prompts])
    plain = np.stack([tiny_session.run(p).logits for p in prompts])
    ids, mask, last = tiny_lm.batch(prompts)
    with torch.no_grad(), patch_residual(tiny_lm.model, vf.layer, last, vector_tensor(tiny_lm, vf), mode=vf.mode, scale=vf.scale):
        theirs = last_logits(tiny_lm, ids, mask, last).numpy()
    assert np.abs(ours - theirs).max() < 1e-2  # kernels differ in the last bits
    assert np.abs(ours - plain).max() > 0.5  # and the vector does move the logits
