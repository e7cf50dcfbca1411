"""tops-serve, end to end: servers on free loopback ports (uvicorn in a thread, one as the real
`tops-serve` command in a subprocess), talked to with the real `openai` client (httpx for what that
client cannot send). Answers equal Pipeline.generate; pruning fields show in `usage`; every bad input
is an OpenAI-style error with its status and the server keeps serving; the queue is FIFO, bounded
(429, nothing lost); a client that leaves or a request past its deadline frees the worker; no image
outlives its answer."""

from __future__ import annotations

import base64
import contextlib
import gc
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from cli_helpers import one_line_error  # noqa: E402
from conftest import make_image  # noqa: E402
from tops_edge.runtime import Pipeline  # noqa: E402

KEY = "test-key"
MODEL = "tiny-llava"
PROMPT = "What is in the picture?"
WAIT_S = 60  # a generous bound on what should happen in well under a second here


@contextlib.contextmanager
def running(app):
    """Serves `app` on a free loopback port from a thread; yields the base URL. The socket listens
    before uvicorn starts, so a client may connect at once (the kernel queues it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def ask(url: str, text: str = PROMPT, *more_urls: str) -> list:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in (url, *more_urls)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def client(base: str, key: str | None = KEY, **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key=key or "none", max_retries=0, timeout=WAIT_S, **kw)


@pytest.fixture(scope="module")
def scene():
    return make_image(336, 336, 3)


@pytest.fixture(scope="module")
def scene_uri(scene):
    return data_uri(png(scene))


@pytest.fixture(scope="module")
def ref(tiny_uniform_dir):
    """The reference pipeline the answers are compared with (each server has its own)."""
    return Pipeline.load(tiny_uniform_dir)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, scene):
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "allowed" / "scene.png").write_bytes(png(scene))
    (root / "outside.png").write_bytes(png(scene))
    (root / "allowed" / "link.png").symlink_to(root / "outside.png")
    return root


@pytest.fixture(scope="module")
def web(scene):
    """A loopback HTTP server with /scene.png, /big.png (over the size limit), /slow.png (answers only
    when the fixture ends) and 404s."""
    files = {"/scene.png": png(scene), "/big.png": png(scene)[:100] + os.urandom(2 * 2**20)}
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                release.wait(WAIT_S)
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()


@pytest.fixture(scope="module")
def main(tiny_uniform_dir, media_dir):
    """The main server: an API key, a queue of 8, local and remote media on, a 600x600 pixel cap."""
    from tops_edge.serve import MediaPolicy, ServerConfig, create_app

    pipe = Pipeline.load(tiny_uniform_dir)
    media = MediaPolicy(allowed_local_path=media_dir / "allowed", allow_remote=True, max_image_pixels=600 * 600,
                        max_image_bytes=2**20, remote_timeout_s=1.0)
    app = create_app(pipe, ServerConfig(api_key=KEY, max_queue=8, request_timeout=60, media=media))
    with running(app) as base:
        yield base, app.state.engine, pipe


def records(engine, ids) -> list[dict]:
    """The engine's records of these jobs, once all of them have ended."""
    ids = set(ids)
    assert engine.wait_until(lambda: ids <= {r["id"] for r in engine.history}, WAIT_S), "jobs did not end"
    return [r for r in engine.history if r["id"] in ids]


def test_answers_streamed_or_not_equal_pipeline_generate(main, ref, scene, scene_uri):
    base, _, _ = main
    c = client(base)
    want = ref.generate(scene, PROMPT, max_new_tokens=16)
    r = c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=16)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == {"length": "length", "eos": "stop"}[want.finish_reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (want.prompt_tokens, len(want.token_ids), want.prompt_tokens + len(want.token_ids))
    assert (r.usage.visual_tokens_before_pruning, r.usage.visual_tokens_after_pruning) == (576, 64)

    chunks = list(c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert len({ch.id for ch in chunks}) == 1

    # sampling: temperature, top_p and seed as Pipeline.generate takes them
    sampled = ref.generate(scene, PROMPT, max_new_tokens=12, temperature=0.9, top_p=0.8, seed=7)
    r = c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_completion_tokens=12, temperature=0.9,
                                  top_p=0.8, seed=7)
    assert r.choices[0].message.content == sampled.text

    # a stop string ends the answer before it, streamed or not
    assert len(want.text) >= 5
    stop = want.text[3:5]
    cut = want.text[: want.text.find(stop)]
    r = c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=16, stop=[stop, "never-there"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=16, stop=stop,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"

    # several turns go through the chat template as one raw prompt
    turns = [{"role": "system", "content": "You look carefully."}, ask(scene_uri)[0]]
    templated = ref.pre.processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": "You look carefully."}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True, tokenize=False)
    r = c.chat.completions.create(model=MODEL, messages=turns, max_tokens=8)
    assert r.choices[0].message.content == ref.generate(scene, templated, max_new_tokens=8, raw_prompt=True).text


def test_pruning_fields_change_usage_and_do_not_leak(main, ref, scene, scene_uri):
    base, _, pipe = main
    c = client(base)

    def kept(**extra):
        r = c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=4, extra_body=extra)
        assert r.usage.visual_tokens_before_pruning == 576
        return r.usage.visual_tokens_after_pruning, r.usage.prompt_tokens

    default, prompt_default = kept()
    assert default == 64
    assert kept(keep=32) == (32, prompt_default - 32)
    assert kept(keep_ratio=0.25)[0] == 144
    assert kept(selector="none")[0] == 576
    assert kept()[0] == 64  # the selector was the request's only
    r = c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=6,
                                  extra_body={"selector": "divprune:merge=none", "keep": 48, "budget": "global"})
    ref.use_selector("divprune")
    ref.merge = "none"
    try:
        assert r.choices[0].message.content == ref.generate(scene, PROMPT, max_new_tokens=6, keep=48).text
    finally:
        ref.use_selector("uniform")
        ref.merge = "mean"
    assert (pipe.selector_method, pipe.merge) == ("uniform", "mean")
    assert c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=6).choices[0].message.content \
        == ref.generate(scene, PROMPT, max_new_tokens=6).text


def _error(exc) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in exc.response.text
    return body["error"]


def test_bad_input_is_an_openai_error_with_its_status_and_the_server_keeps_serving(main, scene, scene_uri, ref,
                                                                                 media_dir, web):
    from PIL import Image

    base, engine, _ = main
    c = client(base)
    good = png(scene)
    cases = []  # (what, status, code, param, call)

    def call(messages=None, **kw):
        return lambda: c.chat.completions.create(model=kw.pop("model", MODEL), messages=messages or ask(scene_uri),
                                                 max_tokens=kw.pop("max_tokens", 4), **kw)

    def raw(content: bytes, headers=None):
        def send():
            response = httpx.post(base + "/v1/chat/completions", content=content, timeout=WAIT_S,
                                  headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
            raise openai.APIStatusError("raw", response=response, body=None)
        return send

    request = json.dumps({"model": MODEL, "messages": ask(scene_uri), "max_tokens": 4}).encode()
    cases += [
        ("malformed JSON", 400, "invalid_json", None, raw(b'{"model": "tiny-llava", "messages": [')),
        ("not an object", 400, "invalid_json", None, raw(b"[1, 2]")),
        ("no image", 400, "missing_image", "messages",
         call([{"role": "user", "content": "What is in the picture?"}])),
        ("corrupt image", 400, "invalid_image", "messages", call(ask(data_uri(os.urandom(300))))),
        ("truncated PNG", 400, "invalid_image", "messages", call(ask(data_uri(good[: len(good) // 2])))),
        ("bad base64", 400, "invalid_image", "messages", call(ask("data:image/png;base64,@@@@"))),
        ("non-image data URI", 400, "invalid_image", "messages", call(ask(data_uri(b"hello", "text/plain")))),
        ("over the pixel cap", 413, "image_too_large", "messages",
         call(ask(data_uri(png(Image.new("RGB", (700, 700), (20, 200, 40))))))),
        ("request too large", 413, "request_too_large", None,
         call(ask(data_uri(os.urandom(3 * 2**20))))),
        ("two images", 400, "too_many_images", "messages", call(ask(scene_uri, PROMPT, scene_uri))),
        ("past the context (max_tokens)", 400, "context_length_exceeded", "messages", call(max_tokens=5000)),
        ("past the context (prompt)", 400, "context_length_exceeded", "messages",
         call(ask(scene_uri, "describe " * 400))),
        ("keep out of range", 400, "invalid_input", "keep", call(extra_body={"keep": 10_000})),
        ("unknown selector", 400, "invalid_selector", "selector", call(extra_body={"selector": "nope"})),
        ("n=2", 400, "unsupported", "n", call(n=2)),
        ("unknown field", 422, "unknown_field", "frobnicate", call(extra_body={"frobnicate": 1})),
        ("temperature of the wrong type", 422, "invalid_type", "temperature", call(temperature="hot")),
        ("keep of the wrong type", 422, "invalid_type", "keep", call(extra_body={"keep": "many"})),
        ("stop of the wrong type", 422, "invalid_type", "stop", call(stop=3)),
        ("a part of the wrong type", 422, "invalid_type", "messages",
         call([{"role": "user", "content": [{"type": "video", "video": "x"}]}])),
        ("no API key", 401, "missing_api_key", None, lambda: httpx.post(
            base + "/v1/chat/completions", content=request, timeout=WAIT_S).raise_for_status()),
        ("wrong API key", 401, "invalid_api_key", None,
         lambda: client(base, key="wrong").chat.completions.create(model=MODEL, messages=ask(scene_uri))),
        ("unknown model", 404, "model_not_found", "model", call(model="gpt-4o")),
        ("file:// outside the allowed directory", 403, "media_not_allowed", "messages",
         call(ask((media_dir / "outside.png").as_uri()))),
        ("file:// symlink out of it", 403, "media_not_allowed", "messages",
         call(ask((media_dir / "allowed" / "link.png").as_uri()))),
        ("file:// missing", 400, "invalid_image", "messages",
         call(ask((media_dir / "allowed" / "none.png").as_uri()))),
        ("remote 404", 400, "invalid_image_url", "messages", call(ask(web + "/missing.png"))),
        ("remote over the byte limit", 413, "image_too_large", "messages", call(ask(web + "/big.png"))),
        ("remote too slow", 400, "invalid_image_url", "messages", call(ask(web + "/slow.png"))),
        ("unknown URL scheme", 400, "invalid_image_url", "messages", call(ask("ftp://example.com/a.png"))),
    ]
    for what, status, code, param, send in cases:
        with pytest.raises((openai.APIStatusError, httpx.HTTPStatusError)) as caught:
            send()
        assert caught.value.response.status_code == status, (what, caught.value.response.text)
        error = _error(caught.value)
        assert (error["code"], error["param"]) == (code, param), (what, error)
        assert error["message"] and "\n" not in error["message"], what
    assert "--" not in _error(_catch(call(extra_body={"keep": 10_000})))["message"]  # the request's names, not flags
    assert "--max-image-pixels" in _error(_catch(cases[7][4]))["message"]

    health = httpx.get(base + "/health", timeout=WAIT_S)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    want = ref.generate(scene, PROMPT, max_new_tokens=4).text
    for url in (scene_uri, (media_dir / "allowed" / "scene.png").as_uri(), web + "/scene.png"):
        assert c.chat.completions.create(model=MODEL, messages=ask(url), max_tokens=4).choices[0].message.content \
            == want
    metrics = httpx.get(base + "/metrics", timeout=WAIT_S).text
    assert _metric(metrics, 'tops_serve_errors_total{kind="too_many_images"}') >= 1
    assert _metric(metrics, 'tops_serve_responses_total{status="422"}') >= 4


def _catch(send):
    try:
        send()
    except openai.APIStatusError as exc:
        return exc
    raise AssertionError("no error")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_models_health_and_metrics(main, scene_uri):
    base, engine, _ = main
    c = client(base)
    assert [m.id for m in c.models.list()] == [MODEL] and c.models.retrieve(MODEL).id == MODEL
    records(engine, [c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=4).id])
    health = httpx.get(base + "/health", timeout=WAIT_S).json()
    assert health == {"status": "ok", "model": MODEL, "busy": False, "queue_depth": 0, "max_queue": 8}
    text = httpx.get(base + "/metrics", timeout=WAIT_S).text
    for name in ("tops_serve_requests_total", "tops_serve_errors_total", "tops_serve_queue_depth",
                 "tops_serve_ttft_seconds", "tops_serve_decode_seconds_per_token", "tops_serve_visual_tokens_kept",
                 "tops_serve_visual_tokens_total"):
        assert f"# TYPE {name} " in text, name
    assert _metric(text, 'tops_serve_requests_total{endpoint="/v1/chat/completions"}') >= 1
    assert _metric(text, "tops_serve_ttft_seconds_count") >= 1
    assert _metric(text, 'tops_serve_visual_tokens_kept_bucket{le="64"}') >= 1
    assert _metric(text, 'tops_serve_visual_tokens_total{stage="before_pruning"}') >= 576
    for line in text.splitlines():  # Prometheus text: comments, or `name{labels} value`
        assert line.startswith("# ") or re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"\})? [0-9.e+-]+|.*\+Inf"\} \d+', line)


def _clients(base, n_clients: int, n_requests: int, scene_uri, **kw):
    """n_clients threads, each sending n_requests in turn (alternately streamed): per client, its
    answers (text, id) or the status of the error."""
    start = threading.Barrier(n_clients)
    out = [[] for _ in range(n_clients)]

    def body(i):
        c = client(base)
        start.wait()
        for j in range(n_requests):
            try:
                if (i + j) % 2:
                    chunks = list(c.chat.completions.create(model=MODEL, messages=ask(scene_uri), stream=True, **kw))
                    out[i].append(("".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[0].id))
                else:
                    r = c.chat.completions.create(model=MODEL, messages=ask(scene_uri), **kw)
                    out[i].append((r.choices[0].message.content, r.id))
            except openai.APIStatusError as exc:
                out[i].append((exc.status_code, exc.response.headers.get("retry-after"), _error(exc)["code"]))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert not any(t.is_alive() for t in threads), "a client hung: a request was lost"
    return [answer for answers in out for answer in answers]


def test_eight_clients_times_five_all_succeed_in_order_of_arrival(main, ref, scene, scene_uri):
    base, engine, _ = main
    want = ref.generate(scene, PROMPT, max_new_tokens=6).text
    answers = _clients(base, 8, 5, scene_uri, max_tokens=6)
    assert len(answers) == 40 and all(a[0] == want for a in answers), [a for a in answers if a[0] != want][:3]
    done = records(engine, [a[1] for a in answers])
    assert [r["outcome"] for r in done] == ["ok"] * 40
    by_start = sorted(done, key=lambda r: r["start"])
    assert [r["seq"] for r in by_start] == sorted(r["seq"] for r in done)  # FIFO: started as admitted


def test_a_full_queue_answers_429_with_retry_after_and_loses_nothing(tiny_uniform_dir, ref, scene, scene_uri):
    from tops_edge.serve import ServerConfig, create_app

    app = create_app(Pipeline.load(tiny_uniform_dir), ServerConfig(max_queue=1))
    with running(app) as base:
        want = ref.generate(scene, PROMPT, max_new_tokens=48).text
        answers = _clients(base, 8, 5, scene_uri, max_tokens=48)
        ok = [a for a in answers if a[0] == want]
        refused = [a for a in answers if a[0] == 429]
        assert len(ok) + len(refused) == 40, [a for a in answers if a not in ok and a not in refused][:3]
        assert ok and refused
        assert all(a[2] == "queue_full" and a[1].isdigit() and int(a[1]) >= 1 for a in refused)
        done = records(app.state.engine, [a[1] for a in ok])
        assert all(r["outcome"] == "ok" for r in done)
        assert len(app.state.engine.history) == len(ok)  # every admitted request was answered
        metrics = httpx.get(base + "/metrics", timeout=WAIT_S).text
        assert _metric(metrics, 'tops_serve_errors_total{kind="queue_full"}') == len(refused)
        # remote media is off on this server
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client(base).chat.completions.create(model=MODEL, messages=ask("https://example.com/a.png"))
        assert _error(caught.value)["code"] == "media_not_allowed"
        assert client(base).chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=48) \
            .choices[0].message.content == want


def test_a_client_that_leaves_mid_stream_frees_the_worker(main, ref, scene, scene_uri):
    base, engine, _ = main
    long = 1900
    assert ref.generate(scene, PROMPT, max_new_tokens=long).finish_reason == "length"  # no EOS before the end
    stream = client(base).chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=long, stream=True)
    contents = 0
    for chunk in stream:
        contents += bool(chunk.choices and chunk.choices[0].delta.content)
        if contents == 2:
            break
    stream.close()  # the connection goes
    record, = records(engine, [chunk.id])
    assert record["outcome"] == "client_disconnected" and record["tokens"] < long
    assert not engine.busy
    assert client(base).chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=4) \
        .choices[0].message.content == ref.generate(scene, PROMPT, max_new_tokens=4).text
    metrics = httpx.get(base + "/metrics", timeout=WAIT_S).text
    assert _metric(metrics, 'tops_serve_errors_total{kind="client_disconnected"}') >= 1


def test_a_request_past_its_timeout_ends_with_a_clear_error_and_one_that_leaves_is_dropped(tiny_uniform_dir, ref,
                                                                                          scene, scene_uri):
    from tops_edge.serve import ServerConfig, create_app

    pipe = Pipeline.load(tiny_uniform_dir)
    offset = [0.0]
    app = create_app(pipe, ServerConfig(request_timeout=2.0), clock=lambda: time.monotonic() + offset[0])
    engine = app.state.engine
    with running(app) as base:
        c = client(base)
        # the pipeline is busy (this thread holds it with an open stream): the request times out waiting
        held = pipe.stream(scene, PROMPT, max_new_tokens=4)
        chunks = iter(held)
        next(chunks)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                list(c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=4, stream=stream)) \
                    if stream else c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=4)
            assert caught.value.status_code == 504
            error = _error(caught.value)
            assert error["code"] == "timeout" and "--request-timeout" in error["message"]
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up while its request waits
            httpx.post(base + "/v1/chat/completions", timeout=0.3,
                       json={"model": MODEL, "messages": ask(scene_uri), "max_tokens": 4})
        assert engine.wait_until(lambda: engine.metrics.errors.value(kind="client_disconnected") == 1, WAIT_S)
        held.close()
        assert engine.wait_until(lambda: len(engine.history) == 3, WAIT_S)
        assert [r["outcome"] for r in engine.history] == ["timeout", "timeout", "client_disconnected"]
        assert [r["tokens"] for r in engine.history][1:] == [0, 0]  # the last two never started generating

        # past the deadline mid-stream (the server's clock jumps): an error event ends the stream
        stream = c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=1900, stream=True)
        with pytest.raises(openai.APIError, match="request-timeout"):
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    offset[0] = 1000.0
        record, = records(engine, [chunk.id])
        assert record["outcome"] == "timeout" and record["tokens"] < 1900
        offset[0] = 0.0
        assert c.chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=4) \
            .choices[0].message.content == ref.generate(scene, PROMPT, max_new_tokens=4).text


def _live_images(size) -> int:
    from PIL import Image

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Image.Image) and o.size == size)


def test_no_image_outlives_its_answer(main, scene_uri):
    base, engine, _ = main
    c = client(base)
    size = (123, 77)
    uri = data_uri(png(make_image(*size, 9)))
    assert _live_images(size) == 0
    c.chat.completions.create(model=MODEL, messages=ask(uri), max_tokens=4)
    assert _live_images(size) == 0
    list(c.chat.completions.create(model=MODEL, messages=ask(uri), max_tokens=4, stream=True))
    assert _live_images(size) == 0
    with pytest.raises(openai.BadRequestError):  # fails in the pipeline, after the image was decoded
        c.chat.completions.create(model=MODEL, messages=ask(uri), max_tokens=5000)
    assert _live_images(size) == 0


# --- the command -----------------------------------------------------------------------------------
def test_tops_serve_bad_arguments_are_one_line_errors(capsys, tmp_path):
    from tops_edge.cli import serve_main

    for argv, needle in ((["/nonexistent"], "not a directory"), ([str(tmp_path), "--port", "70000"], "--port"),
                         ([str(tmp_path), "--max-queue", "0"], "--max-queue"),
                         ([str(tmp_path), "--allowed-local-media-path", str(tmp_path / "no")], "not a directory"),
                         ([str(tmp_path), "--request-timeout", "-1"], "--request-timeout")):
        code = serve_main(argv)
        assert needle in one_line_error(capsys, code), argv


def test_the_tops_serve_command_serves_and_stops_on_sigint(tiny_uniform_dir, ref, scene, scene_uri):
    """The real entry point in a subprocess: it prints where it listens, answers, and exits 0 on
    SIGINT; a second one on the same port is a one-line error."""
    code = "import sys; from tops_edge.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    env = dict(os.environ, TOPS_SERVE_API_KEY=KEY, TOPS_EDGE_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_uniform_dir), "--port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        for line in proc.stderr:  # up to the startup line, printed once it listens
            if "http://" in line:
                break
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # uvicorn's log, drained
        base = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)
        assert "an API key" in line
        r = client(base).chat.completions.create(model=MODEL, messages=ask(scene_uri), max_tokens=6)
        assert r.choices[0].message.content == ref.generate(scene, PROMPT, max_new_tokens=6).text
        port = base.rsplit(":", 1)[1]
        second = subprocess.run([sys.executable, "-c", code, str(tiny_uniform_dir), "--port", port, "--quiet"],
                                env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert second.returncode != 0 and second.stderr.strip().count("\n") == 0
        assert "cannot listen" in second.stderr and "Traceback" not in second.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
