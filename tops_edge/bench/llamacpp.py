"""llama.cpp as a peer for `tops-bench --compare llama.cpp`: the same weights as GGUF (made by
`scripts/compare_llamacpp.py convert`), the same image, the same prompt token ids, greedy decoding of
the same length, run alternately with ours.

llama.cpp runs in a child process (`python -m tops_edge.bench.llamacpp`, driven over JSON lines on
its stdin/stdout), so the two runtimes share no thread pools, allocator or peak-RSS figure, and the
child is a neighbour in time of every run of ours. llama-cpp-python is an optional extra (`[peer]`,
built from source by pip); nothing here imports it outside the child.

What the child times, per generation, on llama.cpp's own path (libmtmd for the image, as
`llama-mtmd-cli` does):
    preprocess  the image bitmap + `mtmd_tokenize` (llama.cpp's resize and normalisation)
    vision      `mtmd_encode_chunk` (CLIP tower + projector)
    prefill     `llama_decode` of the text before the image, `mtmd_helper_decode_image_chunk` of the
                image embeddings, `llama_decode` of the text after it (logits of the last position)
    decode      per token: `llama_decode` of one token (the argmax over the logits outside the span,
                as ours), TPOT = decode / (tokens - 1)
    e2e         the whole generation, KV-cache clear excluded
The prompt is token ids, not text: the ids our tokenizer and chat template produce, so the text
tokenizer of the GGUF never runs (see scripts/compare_llamacpp.py on the byte-level vocabulary).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import BackendUnavailableError, InputError, TopsError

EXTRA = 'pip install -e ".[peer]"'
PEER_FILE = "peer.json"
#: llama.cpp's own defaults (llama-cli, llama-mtmd-cli), unless the caller overrides them
DEFAULT_OPTIONS = {"n_batch": 2048, "n_ubatch": 512, "kv_type": "f16", "flash_attn": "auto", "vision_flash_attn": "auto"}
KV_TYPES = {"f32": 0, "f16": 1}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


def require_llama_cpp(what: str = "--compare llama.cpp") -> None:
    """One line naming the extra when llama-cpp-python is not installed (checked without importing it)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise BackendUnavailableError(f"{what} needs llama-cpp-python, which is not installed: {EXTRA} "
                                      "(pip builds llama.cpp from source, about 6 minutes)")


def load_peer_files(gguf_dir) -> dict:
    """The GGUF folder's peer.json (written by scripts/compare_llamacpp.py convert), its files checked."""
    if gguf_dir is None:
        raise InputError("--compare llama.cpp needs --gguf DIR: the GGUF files of this export, made by "
                         "`python scripts/compare_llamacpp.py convert EXPORT_DIR --out DIR`")
    folder = Path(gguf_dir)
    spec_path = folder / PEER_FILE
    if not spec_path.is_file():
        raise InputError(f"{folder} has no {PEER_FILE}; make it with `python scripts/compare_llamacpp.py convert "
                         f"EXPORT_DIR --out {folder}`")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {spec_path}: {exc}") from None
    for key in ("text", "mmproj"):
        if not isinstance(spec.get(key), str) or not (folder / spec[key]).is_file():
            raise InputError(f"{spec_path}: the {key} GGUF {spec.get(key)!r} is missing from {folder}")
    spec["dir"] = str(folder.resolve())
    return spec


def check_options(options: dict | None) -> dict:
    out = dict(DEFAULT_OPTIONS)
    for key, value in (options or {}).items():
        if key not in DEFAULT_OPTIONS:
            raise InputError(f"unknown llama.cpp option {key!r} (known: {', '.join(DEFAULT_OPTIONS)})")
        out[key] = value
    if out["kv_type"] not in KV_TYPES:
        raise InputError(f"llama.cpp kv_type must be one of {', '.join(KV_TYPES)}, got {out['kv_type']!r}")
    for key in ("flash_attn", "vision_flash_attn"):
        if out[key] not in FLASH_ATTN:
            raise InputError(f"llama.cpp {key} must be one of {', '.join(FLASH_ATTN)}, got {out[key]!r}")
    for key in ("n_batch", "n_ubatch"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise InputError(f"llama.cpp {key} must be a whole number >= 1, got {out[key]!r}")
    return out


class PeerProcess:
    """The llama.cpp child: `start` loads the GGUFs, `generate` runs one timed generation."""

    def __init__(self, spec: dict, threads: int, n_ctx: int, options: dict | None = None):
        require_llama_cpp()
        self.spec, self.threads, self.n_ctx = spec, int(threads), int(n_ctx)
        self.options = check_options(options)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        if spec.get("mtmd_lib"):  # a libmtmd built with the fix for llama.cpp #25814 (see the script)
            env["MTMD_CPP_LIB"] = str(Path(spec["dir"]) / spec["mtmd_lib"])
        self.proc = subprocess.Popen([sys.executable, "-m", "tops_edge.bench.llamacpp"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        folder = Path(spec["dir"])
        self.info = self.call("load", text=str(folder / spec["text"]), mmproj=str(folder / spec["mmproj"]),
                              threads=self.threads, n_ctx=self.n_ctx, **self.options)["info"]

    def call(self, cmd: str, **args) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise TopsError(f"llama.cpp peer: the child process ended during '{cmd}' ({self._last_stderr()})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise TopsError(f"llama.cpp peer: {reply.get('error', 'failed')}")
        return reply

    def _last_stderr(self) -> str:
        self.proc.poll()
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()]
        return (lines[-1] if lines else "no message") + f"; exit status {self.proc.returncode}"

    def set_image(self, image) -> None:
        """The RGB image every generation starts from (llama.cpp preprocesses it itself)."""
        import numpy as np

        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
            np.save(f, rgb)
        try:
            self.call("image", path=f.name)
        finally:
            os.unlink(f.name)

    def generate(self, before, after, new_tokens: int, embd_out: str | None = None) -> dict:
        return self.call("generate", before=[int(t) for t in before], after=[int(t) for t in after],
                         new_tokens=int(new_tokens), embd_out=embd_out)

    def generate_from_features(self, before, after, features, new_tokens: int) -> list[int]:
        """Greedy tokens from given visual embeddings (ours): the decoder alone, compared."""
        import numpy as np

        with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
            np.save(f, np.ascontiguousarray(features, dtype=np.float32))
        try:
            return self.call("generate_features", before=[int(t) for t in before], after=[int(t) for t in after],
                             features=f.name, new_tokens=int(new_tokens))["token_ids"]
        finally:
            os.unlink(f.name)

    def peak_rss_bytes(self) -> int | None:
        return self.call("rss")["peak_rss_bytes"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except TopsError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the child process ---------------------------------------------------------------------
class _Runner:
    """llama.cpp through llama-cpp-python's ctypes bindings (llama.h and mtmd.h as they are)."""

    def __init__(self, text: str, mmproj: str, threads: int, n_ctx: int, n_batch: int, n_ubatch: int,
                 kv_type: str, flash_attn: str, vision_flash_attn: str):
        import ctypes

        import llama_cpp as lib
        from llama_cpp import llama_cpp as L
        from llama_cpp import mtmd_cpp as M

        self.ctypes, self.L, self.M = ctypes, L, M
        self._quiet = L.llama_log_callback(lambda level, text, user: None)  # kept alive: C holds it
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        M.mtmd_log_set(self._quiet, ctypes.c_void_p(0))
        M.mtmd_helper_log_set(self._quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(text.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {text}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_ubatch
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = FLASH_ATTN[flash_attn]
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp cannot create a context")
        self.n_batch = n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_embd = L.llama_model_n_embd(self.model)
        mparams = M.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.print_timings = False
        mparams.n_threads = threads
        mparams.flash_attn_type = FLASH_ATTN[vision_flash_attn]
        self.mctx = M.mtmd_init_from_file(mmproj.encode(), self.model, mparams)
        if not self.mctx:
            raise RuntimeError(f"libmtmd cannot load {mmproj}")
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.rgb = None
        self.info = {
            "llama_cpp_python": lib.__version__, "system_info": L.llama_print_system_info().decode(errors="replace"),
            "n_vocab": int(self.n_vocab), "n_embd": int(self.n_embd), "threads": threads, "n_ctx": n_ctx,
            "n_batch": n_batch, "n_ubatch": n_ubatch, "kv_type": kv_type, "flash_attn": flash_attn,
            "vision_flash_attn": vision_flash_attn,
            "model_bytes": int(L.llama_model_size(self.model)),
            "mtmd_lib": os.environ.get("MTMD_CPP_LIB") or "bundled",
        }

    # -- the pieces
    def _decode_tokens(self, ids, n_past: int, logits_last: bool) -> None:
        b = self.batch
        for start in range(0, len(ids), self.n_batch):
            part = ids[start: start + self.n_batch]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = n_past + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
            if logits_last and start + len(part) == len(ids):
                b.logits[len(part) - 1] = 1
            if self.L.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")

    def _decode_embd(self, features, n_past: int) -> None:
        """Our visual embeddings [n, n_embd] into the cache (the decoder parity check)."""
        import numpy as np

        L = self.L
        n = features.shape[0]
        for start in range(0, n, self.n_batch):
            part = np.ascontiguousarray(features[start: start + self.n_batch], dtype=np.float32)
            b = L.llama_batch_init(len(part), self.n_embd, 1)
            try:
                b.n_tokens = len(part)
                self.ctypes.memmove(b.embd, part.ctypes.data, part.nbytes)
                for i in range(len(part)):
                    b.pos[i] = n_past + start + i
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = 0
                    b.logits[i] = 0
                if L.llama_decode(self.ctx, b) != 0:
                    raise RuntimeError("llama_decode of the embeddings failed")
            finally:
                L.llama_batch_free(b)

    def _argmax(self) -> int:
        import numpy as np

        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _decode_loop(self, first: int, n_past: int, new_tokens: int) -> tuple[list[int], float]:
        tokens, decode_s = [first], 0.0
        b, clock = self.batch, time.perf_counter
        for i in range(new_tokens - 1):
            t = clock()
            b.n_tokens = 1
            b.token[0] = tokens[-1]
            b.pos[0] = n_past + i
            b.n_seq_id[0] = 1
            b.seq_id[0][0] = 0
            b.logits[0] = 1
            if self.L.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            decode_s += clock() - t
            tokens.append(self._argmax())
        return tokens, decode_s

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    # -- the commands
    def image(self, path: str) -> dict:
        import numpy as np

        rgb = np.load(path)
        self.rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        return {}

    def generate(self, before, after, new_tokens: int, embd_out=None) -> dict:
        import numpy as np

        L, M, ct = self.L, self.M, self.ctypes
        if self.rgb is None:
            raise RuntimeError("no image set")
        self._clear()
        clock = time.perf_counter
        t0 = clock()
        h, w = self.rgb.shape[:2]
        bitmap = M.mtmd_bitmap_init(w, h, self.rgb.ctypes.data_as(ct.POINTER(ct.c_uint8)))
        chunks = M.mtmd_input_chunks_init()
        try:
            part = M.mtmd_input_part()
            part.text = ct.cast(None, ct.POINTER(M.mtmd_input_text))
            part.bitmap = bitmap
            parts = (ct.POINTER(M.mtmd_input_part) * 1)(ct.pointer(part))
            if M.mtmd_tokenize_from_parts(self.mctx, chunks, parts, 1, False) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            chunk = M.mtmd_input_chunks_get(chunks, 0)
            n_image = int(M.mtmd_input_chunk_get_n_tokens(chunk))
            t1 = clock()
            if M.mtmd_encode_chunk(self.mctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            embd = M.mtmd_get_output_embd(self.mctx)
            t2 = clock()
            self._decode_tokens(list(before), 0, logits_last=False)
            new_past = L.llama_pos(0)
            if M.mtmd_helper_decode_image_chunk(self.mctx, self.ctx, chunk, embd, len(before), 0, self.n_batch,
                                                ct.byref(new_past), M.mtmd_helper_post_decode_callback(), None) != 0:
                raise RuntimeError("mtmd_helper_decode_image_chunk failed")
            n_past = int(new_past.value)
            self._decode_tokens(list(after), n_past, logits_last=True)
            n_past += len(after)
            t3 = clock()  # as ours: the first token's argmax is outside the prefill
            tokens, decode_s = self._decode_loop(self._argmax(), n_past, new_tokens)
            t4 = clock()
            if embd_out:
                np.save(embd_out, np.ctypeslib.as_array(embd, shape=(n_image, self.n_embd)).copy())
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)
        ms = lambda s: round(s * 1e3, 4)  # noqa: E731
        steps = len(tokens) - 1
        return {"timings_ms": {"preprocess": ms(t1 - t0), "vision": ms(t2 - t1), "prefill": ms(t3 - t2),
                               "decode_per_token": ms(decode_s / steps) if steps else 0.0},
                "e2e_ms": ms(t4 - t0), "token_ids": tokens, "prompt_tokens": len(before) + n_image + len(after),
                "image_tokens": n_image}

    def generate_features(self, before, after, features: str, new_tokens: int) -> dict:
        import numpy as np

        feats = np.load(features)
        self._clear()
        self._decode_tokens(list(before), 0, logits_last=False)
        self._decode_embd(feats, len(before))
        n_past = len(before) + feats.shape[0]
        self._decode_tokens(list(after), n_past, logits_last=True)
        tokens, _ = self._decode_loop(self._argmax(), n_past + len(after), new_tokens)
        return {"token_ids": tokens}


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _worker() -> int:
    """The child's loop: one JSON command per stdin line, one JSON reply per stdout line. C code's
    own stdout is sent to stderr so the replies stay clean."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    runner = None
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        try:
            if cmd == "quit":
                out.write(json.dumps({"ok": True}) + "\n")
                break
            if cmd == "load":
                runner = _Runner(**msg)
                reply = {"info": runner.info}
            elif cmd == "rss":
                reply = {"peak_rss_bytes": _peak_rss_bytes()}
            elif runner is None:
                raise RuntimeError("not loaded")
            else:
                reply = getattr(runner, cmd)(**msg)
            out.write(json.dumps({"ok": True, **reply}) + "\n")
        except Exception as exc:  # reported to the parent as one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            out.write(json.dumps({"ok": False, "error": f"{cmd}: {first}"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
