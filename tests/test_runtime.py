"""Runtime behaviour beyond parity: sampling, streaming, KV reuse, context limit, Python API errors."""

from __future__ import annotations

import numpy as np
import pytest

from tops_edge.errors import BackendUnavailableError, ContextLengthError, InputError
from tops_edge.runtime import Pipeline
from tops_edge.runtime.sampling import next_token


def test_seeded_sampling_is_reproducible_and_seed_dependent(pipe_uniform, images):
    run = lambda seed: pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=12, temperature=1.5, seed=seed).token_ids  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_greedy_is_the_default_and_ignores_the_seed(pipe_uniform, images):
    a = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=8, seed=1)
    b = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=8, seed=2)
    assert a.token_ids == b.token_ids


def test_output_logits_are_what_each_token_was_chosen_from(pipe_uniform, images):
    plain = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=6, ignore_eos=True)
    r = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=6, ignore_eos=True, output_logits=True)
    assert plain.logits is None and r.token_ids == plain.token_ids
    assert len(r.logits) == 6 and all(s.shape == r.logits[0].shape and s.dtype == np.float32 for s in r.logits)
    assert [int(np.argmax(s)) for s in r.logits] == r.token_ids  # greedy: each token is its logits' argmax
    assert not np.array_equal(r.logits[0], r.logits[1])  # copies, not the backend's reused buffer
    assert "logits" not in r.to_json() and set(r.to_json()) == set(plain.to_json())


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    rng = np.random.default_rng(0)
    draws = {next_token(logits, 1.0, 0.8, rng) for _ in range(300)}
    assert draws == {0, 1}
    assert {next_token(logits, 1.0, 0.5, rng) for _ in range(50)} == {0}


def test_stream_yields_the_same_tokens_and_text_as_generate(pipe_uniform, images):
    full = pipe_uniform.generate(images["tall"], "Describe it.", max_new_tokens=10)
    stream = pipe_uniform.stream(images["tall"], "Describe it.", max_new_tokens=10)
    chunks = list(stream)
    assert [c.token_id for c in chunks if c.token_id is not None] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text
    assert stream.result.token_ids == full.token_ids


def test_generation_stops_at_eos(pipe_uniform, images, monkeypatch):
    eos = next(iter(pipe_uniform.eos_ids))
    calls = {"n": 0}
    real_step, real_token = pipe_uniform.decoder.step, pipe_uniform.decoder.step_token

    def forced(logits):  # force EOS as the third token
        logits = logits.copy()
        calls["n"] += 1
        if calls["n"] == 3:
            logits[eos] = 1e9
        return logits

    monkeypatch.setattr(pipe_uniform.decoder, "step", lambda embeds, positions, *rest: forced(real_step(embeds, positions, *rest)))
    monkeypatch.setattr(pipe_uniform.decoder, "step_token", lambda position: forced(real_token(position)))
    r = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=20)
    assert r.token_ids[-1] == eos and len(r.token_ids) == 3 and r.finish_reason == "eos"


def test_kv_cache_is_allocated_once_and_reused_across_calls(pipe_uniform, images):
    pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=16)
    dec = pipe_uniform.decoder
    buffers, pointers = [id(b) for b in dec._buffers], [b.ctypes.data for b in dec._buffers]
    pipe_uniform.generate(images["wide"], "Hi again", max_new_tokens=8, keep=32)
    assert [id(b) for b in dec._buffers] == buffers  # no new allocation: the same arrays ...
    assert [b.ctypes.data for b in dec._buffers] == pointers  # ... and the same memory


def test_kv_cache_is_one_buffer_per_tensor(pipe_uniform, images):
    """The graph returns only each step's rows and the runner writes them into its buffers: the KV
    memory it owns is one [1, H, capacity, D] buffer per past tensor, which bytes_used fills."""
    r = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=6, ignore_eos=True)
    dec = pipe_uniform.decoder
    layout = dec.layout
    per_token = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * layout.itemsize
    assert len(dec._buffers) == len(dec.past_names) == 2 * layout.num_layers
    assert dec.bytes_allocated == dec.capacity * per_token == dec.capacity * layout.bytes_per_token()
    assert dec.bytes_used == dec.length * per_token == (r.prompt_tokens + 5) * per_token
    outputs = {o.name: o.shape for o in dec.sess.get_outputs()}
    for name in dec.present_names:  # this step's rows [B, H, S, D], not the cache
        assert outputs[name][1:] == [layout.num_kv_heads, "sequence", layout.head_dim], outputs[name]


def test_decode_loop_binds_nothing_per_token(pipe_uniform, images):
    """The fixed-size cache keeps every decode step's shapes, so a generation's bindings are made
    once: a second generation of the same size binds only its prefill inputs and present rows (the
    decode binding's were bound by the first), however many tokens it decodes."""
    pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=16, ignore_eos=True)
    dec = pipe_uniform.decoder
    calls = []
    for binding in (dec._step_binding, dec._token_binding):
        for method in ("bind_input", "bind_cpu_input", "bind_output", "bind_ortvalue_input"):
            real = getattr(binding, method)
            setattr(binding, method, lambda *a, _real=real, _m=method, **k: (calls.append(_m), _real(*a, **k))[1])
    r = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=16, ignore_eos=True)
    assert len(r.token_ids) == 16 and dec.length == r.prompt_tokens + 15
    # prefill: embeds, positions, slots and its present rows; decode: nothing
    assert len(calls) == 3 + len(dec.present_names), calls


def test_context_limit_is_a_clear_error(pipe_uniform, images):
    with pytest.raises(ContextLengthError, match="context of 2048"):
        pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=2000, keep=576)


def test_image_as_array_equals_image_as_pil(pipe_uniform, images):
    img = images["square"]
    assert pipe_uniform.generate(np.asarray(img), "Hi", max_new_tokens=4).token_ids == \
        pipe_uniform.generate(img, "Hi", max_new_tokens=4).token_ids


def test_bad_image_type_is_an_input_error(pipe_uniform):
    with pytest.raises(InputError, match="unsupported image type"):
        pipe_uniform.generate(42, "Hi")


def test_trt_backend_without_tensorrt_names_the_package(tiny_uniform_dir):
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        Pipeline.load(tiny_uniform_dir, backend="trt")


def test_decode_step_matches_a_full_step_and_binds_buffers_once(pipe_uniform, images):
    """step_token (the loop's path: one-token buffers bound once) gives the logits of step() on
    the same embedding and position, and leaves the cache in the same state."""
    from tops_edge.runtime.backend import KVLayout

    dec = pipe_uniform.decoder
    prompt = np.random.default_rng(0).standard_normal((1, 7, dec.hidden_size)).astype(np.float32)
    token = np.random.default_rng(1).standard_normal((1, 1, dec.hidden_size)).astype(np.float32)
    outputs = []
    for fast in (False, True):
        dec.reserve(16)
        dec.reset()
        dec.step(prompt, np.arange(7)[None])
        logits = []
        for position in (7, 8, 9):
            if fast:
                dec.token_embeds[...] = token * position
                logits.append(dec.step_token(position).copy())
            else:
                logits.append(dec.step(token * position, np.array([[position]])).copy())
        outputs.append((np.stack(logits), dec.length))
    np.testing.assert_allclose(outputs[0][0], outputs[1][0], rtol=0, atol=1e-5)
    assert outputs[0][1] == outputs[1][1] == 10
    assert isinstance(dec.layout, KVLayout)


def test_bound_session_run_equals_run_and_sees_rewritten_inputs(pipe_uniform):
    from tops_edge.runtime.backend import Session

    embed = pipe_uniform.embed
    ids = np.zeros((1, 1), dtype=np.int64)
    out = np.zeros((1, 1, pipe_uniform.decoder.hidden_size), dtype=np.float32)
    run_bound = embed.bind({"input_ids": ids}, {"inputs_embeds": out})
    # the base class's default (used by backends without IO binding) against ORT's bound run
    generic = Session.bind(embed, {"input_ids": ids}, {"inputs_embeds": (out_generic := np.zeros_like(out))})
    for token in (5, 17, 5):
        ids[0, 0] = token
        run_bound()
        generic()
        expected = embed.run({"input_ids": np.array([[token]])})["inputs_embeds"]
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out_generic, expected)


def test_the_runtime_imports_neither_the_exporter_nor_the_precision_passes():
    """calib -> runtime -> export -> calib was a circle: the runtime reads the manifest and builds
    selector graphs through selector/, never the exporter."""
    import subprocess
    import sys

    code = ("import sys, tops_edge.runtime.pipeline; "
            "print(sorted(m for m in sys.modules if m.startswith(('tops_edge.export.exporter', 'tops_edge.calib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
