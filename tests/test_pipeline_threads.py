"""One Pipeline shared by threads, as a robot application shares it: concurrent `generate` and `stream`
calls each return what the same call returns alone, an abandoned stream gives the pipeline back, and
a thread that calls again with its own stream still open gets an error instead of a deadlock. Also
the ROS 2 example's callbacks (examples/ros2_node.py), driven with stand-in messages."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_image
from tops_edge.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
JOIN_S = 120  # a generous bound on a thread that should finish (each call takes ~0.1 s here)


@pytest.fixture(scope="module")
def pipe(tiny_uniform_dir):
    """The module's own Pipeline (this file switches selectors; the session's pipe_uniform is shared)."""
    from tops_edge.runtime import Pipeline

    return Pipeline.load(tiny_uniform_dir)


@pytest.fixture(scope="module")
def scenes():
    return [make_image(336, 336, 3), make_image(480, 300, 1), make_image(260, 420, 2)]


def _calls(scenes):
    """Four threads' calls, each different (image, prompt, budget, length, sampling), so that a call
    that read another's state would show it."""
    prompts = ["What is in the picture?", "Describe the image in detail.", "How many red circles are there?",
               "Where is the largest object?"]
    plan = []
    for t in range(4):
        calls = []
        for j in range(3):
            k = 3 * t + j
            calls.append(dict(kind="stream" if (t + j) % 2 else "generate", image=scenes[k % 3], prompt=prompts[k % 4],
                              max_new_tokens=6 + 5 * (k % 4), keep=(16, 32, 64, 100)[(k + t) % 4],
                              temperature=0.0 if k % 3 else 0.8, seed=k))
        plan.append(calls)
    return plan


def _run(pipe, call):
    """A call's result as comparable values; a stream's chunks must add up to its result."""
    options = {k: v for k, v in call.items() if k not in ("kind", "image", "prompt")}
    if call["kind"] == "generate":
        r = pipe.generate(call["image"], call["prompt"], **options)
    else:
        stream = pipe.stream(call["image"], call["prompt"], **options)
        chunks = list(stream)
        r = stream.result
        assert "".join(c.text for c in chunks) == r.text
        assert [c.token_id for c in chunks if c.token_id is not None] == r.token_ids
    return (r.text, r.token_ids, r.kept_indices, r.kept_sizes, r.prompt_tokens, r.finish_reason, r.keep)


def _in_threads(targets):
    """Runs each target in its own thread, all released at once; returns their results or raises the
    first error one of them raised."""
    start = threading.Barrier(len(targets))
    out: list = [None] * len(targets)
    errors: list = []

    def body(i, target):
        try:
            start.wait()
            out[i] = target()
        except BaseException as exc:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return out


def test_concurrent_generate_and_stream_equal_the_same_calls_alone(pipe, scenes):
    plan = _calls(scenes)
    alone = [[_run(pipe, call) for call in calls] for calls in plan]
    together = _in_threads([lambda calls=calls: [_run(pipe, call) for call in calls] for calls in plan])
    for t, (got, want) in enumerate(zip(together, alone)):
        for j, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"thread {t}, call {j} ({plan[t][j]['kind']}) differs from the same call alone"


def test_a_stream_started_while_another_runs_waits_for_it_and_both_equal_alone(pipe, scenes):
    """The first stream takes one chunk, then goes on only once the second has asked for its first
    chunk: the second waits for the first to end; neither sees the other's state."""
    calls = [dict(kind="stream", image=scenes[0], prompt="What is in the picture?", max_new_tokens=300, keep=32,
                  temperature=0.0, seed=None, ignore_eos=True),
             dict(kind="stream", image=scenes[1], prompt="Describe the image in detail.", max_new_tokens=9, keep=100,
                  temperature=0.0, seed=None)]
    alone = [_run(pipe, c) for c in calls]
    first_running, second_asking = threading.Event(), threading.Event()

    def consumer(i):
        options = {k: v for k, v in calls[i].items() if k not in ("kind", "image", "prompt")}
        stream = pipe.stream(calls[i]["image"], calls[i]["prompt"], **options)
        if i == 1:
            first_running.wait(JOIN_S)
            second_asking.set()
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if i == 0 and len(chunks) == 1:
                first_running.set()
                second_asking.wait(JOIN_S)
        r = stream.result
        return (r.text, r.token_ids, r.kept_indices, r.kept_sizes, r.prompt_tokens, r.finish_reason, r.keep)

    assert _in_threads([lambda: consumer(0), lambda: consumer(1)]) == alone


def test_an_abandoned_stream_gives_the_pipeline_back(pipe, scenes):
    image, prompt = scenes[0], "What is in the picture?"
    want = pipe.generate(image, prompt, max_new_tokens=8)

    # a for loop left early, the stream object still referenced: its result is the tokens so far
    stream = pipe.stream(image, prompt, max_new_tokens=20, ignore_eos=True)
    for i, chunk in enumerate(stream):
        if i == 2:
            break
    assert stream.result is not None and stream.result.finish_reason == "stop"
    assert stream.result.token_ids == [c for c in pipe.generate(image, prompt, max_new_tokens=3).token_ids]
    assert list(stream) == []  # a closed stream yields nothing more

    # another thread is not kept waiting by the abandoned stream
    assert _in_threads([lambda: pipe.generate(image, prompt, max_new_tokens=8).token_ids]) == [want.token_ids]

    # an iterator dropped mid-way (CPython frees it at once), close(), and a with block
    it = iter(pipe.stream(image, prompt, max_new_tokens=20))
    next(it)
    del it
    assert pipe.generate(image, prompt, max_new_tokens=8).token_ids == want.token_ids
    stream = pipe.stream(image, prompt, max_new_tokens=20)
    chunks = iter(stream)
    next(chunks)
    stream.close()
    assert stream.result.finish_reason == "stop" and len(stream.result.token_ids) == 1
    with pipe.stream(image, prompt, max_new_tokens=20) as stream:
        chunks = iter(stream)
        next(chunks)
    assert stream.result.finish_reason == "stop"
    del chunks
    assert pipe.generate(image, prompt, max_new_tokens=8).token_ids == want.token_ids

    # a stream never iterated holds nothing; a stream whose generation fails gives the pipeline back
    idle = pipe.stream(image, prompt, max_new_tokens=20)
    assert pipe.generate(image, prompt, max_new_tokens=8).token_ids == want.token_ids
    del idle
    with pytest.raises(InputError, match="keep"):
        list(pipe.stream(image, prompt, keep=10_000))
    assert pipe.generate(image, prompt, max_new_tokens=8).token_ids == want.token_ids


def test_a_thread_calling_again_with_its_stream_open_gets_an_error_not_a_deadlock(pipe, scenes):
    image, prompt = scenes[2], "Where is the largest object?"

    def reenter():
        stream = pipe.stream(image, prompt, max_new_tokens=10)
        chunks = iter(stream)
        next(chunks)  # the stream now holds the pipeline (its iteration is not over)
        errors = []
        for call in (lambda: pipe.generate(image, prompt, max_new_tokens=2), lambda: pipe.use_selector("none")):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))
        stream.close()
        return errors, pipe.generate(image, prompt, max_new_tokens=2).token_ids

    (errors, after), = _in_threads([reenter])  # in a thread: a deadlock would fail the join, not hang the suite
    assert len(errors) == 2 and all("close() it" in e for e in errors), errors
    assert len(after) >= 1
    assert pipe.selector_method == "uniform"


def test_use_selector_from_another_thread_waits_for_the_running_stream(pipe, scenes):
    """A switch requested while a stream runs applies to the next generation, not to the rest of it."""
    image, prompt = scenes[1], "Describe the image in detail."
    want = pipe.stream(image, prompt, max_new_tokens=10, ignore_eos=True)
    want = (list(want), want.result)[1]
    holding, switched = threading.Event(), threading.Event()

    def streamer():
        stream = pipe.stream(image, prompt, max_new_tokens=10, ignore_eos=True)
        seen = []
        for i, _ in enumerate(stream):
            seen.append(switched.is_set())  # the stream holds the pipeline here
            if i == 0:
                holding.set()
        return stream.result, any(seen)

    def switcher():
        holding.wait(JOIN_S)
        pipe.use_selector("none")
        switched.set()

    try:
        (result, switched_during), _ = _in_threads([streamer, switcher])
        assert not switched_during  # the stream ended before the switch could happen
        assert result.token_ids == want.token_ids and result.kept_indices == want.kept_indices
        assert len(pipe.generate(image, prompt, max_new_tokens=2).kept_indices) == 576
    finally:
        pipe.use_selector("uniform")


# --- examples/ros2_node.py -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ros2_node():
    spec = importlib.util.spec_from_file_location("ros2_node", ROOT / "examples" / "ros2_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no rclpy here: the example imports it inside main()
    return module


def _image_msg(rgb: np.ndarray, encoding: str, pad: int = 0):
    """A stand-in sensor_msgs/Image: rows of `step` bytes (with `pad` bytes of row padding)."""
    pixels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
              "bgra8": np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 255, np.uint8)]),
              "mono8": rgb[..., 0]}[encoding]
    rows = pixels.reshape(rgb.shape[0], -1)
    rows = np.hstack([rows, np.zeros((rows.shape[0], pad), np.uint8)])
    return SimpleNamespace(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, is_bigendian=0,
                           step=rows.shape[1], data=rows.tobytes())


def test_ros2_callbacks_answer_about_the_latest_frame(ros2_node, pipe, scenes):
    rgb = np.asarray(scenes[1])
    published, logged = [], []
    bridge = ros2_node.VlmBridge(pipe, publish=published.append, log=logged.append, max_new_tokens=6, keep=32)

    bridge.on_query(SimpleNamespace(data="What is in the picture?"))  # no frame yet: nothing published
    assert published == [] and "no image" in logged[-1]

    for encoding in ("bgr8", "rgba8", "bgra8"):
        bridge.on_image(_image_msg(rgb, encoding, pad=3))
        assert np.array_equal(bridge.latest_frame(), rgb), encoding
    bridge.on_image(_image_msg(rgb, "rgb8", pad=5))
    bridge.on_query(SimpleNamespace(data="What is in the picture?"))
    assert published == [pipe.generate(rgb, "What is in the picture?", max_new_tokens=6, keep=32).text]

    bridge.on_image(_image_msg(rgb, "mono8"))
    grey = np.repeat(rgb[..., :1], 3, axis=2)
    assert np.array_equal(bridge.latest_frame(), grey)

    before = len(published)
    bridge.on_image(SimpleNamespace(height=2, width=2, encoding="16UC1", is_bigendian=0, step=4, data=bytes(8)))
    assert "16UC1" in logged[-1]  # refused; the last good frame stays
    assert np.array_equal(bridge.latest_frame(), grey)
    bridge.on_query(SimpleNamespace(data="   "))  # an empty question: logged, nothing published
    assert len(published) == before and "empty" in logged[-1]
    bridge.on_image(SimpleNamespace(height=4, width=4, encoding="rgb8", is_bigendian=0, step=12, data=bytes(10)))
    assert "bytes" in logged[-1]
