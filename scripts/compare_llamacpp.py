"""The llama.cpp peer of `tops-bench --compare llama.cpp`: convert an export's source model to GGUF,
check that llama.cpp computes what we compute, and (optionally) build libmtmd with the CLS fix.

    # the llama.cpp tree: llama-cpp-python's sdist ships it (vendor/llama.cpp, with convert_hf_to_gguf.py and gguf-py)
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llpkg
    python scripts/compare_llamacpp.py convert /tmp/med --out /tmp/med-gguf --llama-cpp /tmp/llpkg/llama_cpp_python-0.3.36.tar.gz
    python scripts/compare_llamacpp.py build-mtmd /tmp/med-gguf --llama-cpp /tmp/llpkg/llama_cpp_python-0.3.36.tar.gz   # optional
    python scripts/compare_llamacpp.py check /tmp/med-gguf /tmp/med
    tops-bench /tmp/med --compare llama.cpp --gguf /tmp/med-gguf --keep 576,128,64 --new-tokens 64

`convert` loads the model named in the export's manifest (its config hash checked), and writes:
  text-<outtype>.gguf   the Llama decoder (f32 or f16) by llama.cpp's convert_hf_to_gguf.py, from a
                        LlamaForCausalLM holding the LLaVA's language model and lm_head
  mmproj-f32.gguf       the CLIP tower and the projector by llama.cpp's CLIP-LLaVA converter
                        (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py, --use-f32); what
                        that converter writes in f16 even so (the patch convolution, the projector's
                        two matrices) is rewritten in f32 from the checkpoint (--converter-f16 keeps it)
  peer.json             what tops-bench reads: the files, the source, the workarounds applied
Workarounds, applied here and recorded in peer.json:
  llama.cpp #25817      the last vision layer dropped twice (the converter drops it, then clip.cpp
                        again): `"vision_feature_layer": -2` is put in the vision config before
                        converting, so the GGUF says which layer feeds the projector (LLaVA-1.5's
                        second-to-last). Without it the tower runs one layer short: cheaper and wrong.
  byte-level vocabulary convert_hf_to_gguf.py knows BPE pre-tokenizers by the hash of a test
                        string's tokens; the built-in models' byte-level BPE (no merges) is not
                        among them, so an unknown hash is written as llama.cpp's "default"
                        pre-tokenizer. With no merges every byte is its own token under any split, so
                        this is faithful; and the benchmark feeds token ids (ours), never text.
                        llama.cpp's BPE loader needs a merges list, and GGUF cannot hold an empty
                        one: one inert merge "<s> </s>" is written (BPE starts from single
                        characters and no other merge exists, so it never applies).
  llama.cpp #25814      clip.cpp's LLaVA graph puts the CLS embedding after the patches (wrong
                        features, the same cost). Fixed upstream by PR #25844; `build-mtmd` builds
                        libmtmd from the same llama.cpp tree with the equivalent one-line change
                        (CLS first) and records it in peer.json, so tops-bench loads it
                        (MTMD_CPP_LIB) in place of the bundled one. The timings do not depend on it.
`check` runs both runtimes on one image and prompt: the image embeddings' max |difference|, our
greedy tokens against llama.cpp's (whole path), and against llama.cpp's decoder fed our embeddings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tops_edge.bench.llamacpp import PEER_FILE, require_llama_cpp  # noqa: E402
from tops_edge.errors import InputError, TopsError  # noqa: E402

#: the one-line fix of llama.cpp #25814 in tools/mtmd/models/llava.cpp: CLS before the patches
CLS_BUG = "inp = ggml_concat(ctx0, inp, model.class_embedding, 1);"
CLS_FIX = "inp = ggml_concat(ctx0, model.class_embedding, inp, 1);"


# --- the llama.cpp tree ----------------------------------------------------------------------
class LlamaCppTree:
    """vendor/llama.cpp of llama-cpp-python's sdist (a .tar.gz, extracted to a temporary folder, or
    an extracted folder), or a llama.cpp checkout."""

    def __init__(self, path):
        if path is None:
            path = os.environ.get("LLAMA_CPP_SRC")
        if not path:
            raise InputError("--llama-cpp PATH is needed: llama-cpp-python's sdist (.tar.gz) or a llama.cpp tree "
                             "(or set LLAMA_CPP_SRC)")
        path = Path(path)
        self._tmp = None
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            self._tmp = tempfile.mkdtemp(prefix="llama-cpp-src-")
            with tarfile.open(path) as tar:
                tar.extractall(self._tmp, filter="data")
            path = Path(self._tmp)
        for root in (path, path / "vendor" / "llama.cpp", *sorted(path.glob("*/vendor/llama.cpp"))):
            if (root / "convert_hf_to_gguf.py").is_file() and (root / "gguf-py").is_dir():
                self.root = root
                break
        else:
            self.close()
            raise InputError(f"{path} holds no llama.cpp tree (convert_hf_to_gguf.py and gguf-py)")
        self.legacy_clip = self.root / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"
        if not self.legacy_clip.is_file():
            self.close()
            raise InputError(f"{self.root} has no {self.legacy_clip.relative_to(self.root)}")

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root / "gguf-py"), str(self.root), env.get("PYTHONPATH", "")])
        env["NO_LOCAL_GGUF"] = "1"  # gguf-py is on PYTHONPATH already
        return env

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def run(cmd, env, what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        raise TopsError(f"{what} failed (exit {proc.returncode}): {tail[0]}")


# --- convert ---------------------------------------------------------------------------------
def load_source(export_dir: Path):
    from tops_edge.models import load
    from tops_edge.models.base import config_sha256

    manifest = json.loads((export_dir / "manifest.json").read_text())
    if manifest["visual"]["layout"] != "single" or manifest["model"]["family"] != "llava":
        raise InputError("the llama.cpp peer covers LLaVA-1.5 exports (one 336px CLIP crop, a Llama decoder)")
    adapter = load(manifest["model"]["source"])
    if config_sha256(adapter.model.config) != manifest["model"].get("config_sha256"):
        raise InputError(f"{manifest['model']['source']} no longer matches the export's config hash")
    return manifest, adapter


def save_hf_parts(adapter, work: Path) -> tuple[Path, Path, Path]:
    """The LLaVA split as llama.cpp's converters want it: a LlamaForCausalLM folder (with the
    tokenizer), a CLIPVisionModel folder (config with the #25817 workaround) and the projector."""
    import torch
    from transformers import LlamaForCausalLM

    model = adapter.model.eval()
    cfg = model.config
    text_dir, vision_dir = work / "hf-text", work / "hf-vision"
    lm = LlamaForCausalLM(cfg.text_config).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise TopsError(f"the language model's weights do not map onto LlamaForCausalLM: {missing[:3]} {unexpected[:3]}")
    lm.save_pretrained(text_dir, safe_serialization=True)
    adapter.processor.tokenizer.save_pretrained(text_dir)

    model.model.vision_tower.save_pretrained(vision_dir, safe_serialization=True)
    config_path = vision_dir / "config.json"
    vision_config = json.loads(config_path.read_text())
    # llama.cpp #25817: say which layer feeds the projector, or the last one is dropped twice
    vision_config["vision_feature_layer"] = int(cfg.vision_feature_layer)
    config_path.write_text(json.dumps(vision_config, indent=2))
    projector = work / "llava.projector"
    torch.save({f"multi_modal_projector.{k}": v.detach().clone() for k, v in
                model.model.multi_modal_projector.state_dict().items()}, projector)
    if cfg.vision_feature_select_strategy != "default" or cfg.projector_hidden_act != "gelu":
        raise InputError("llama.cpp's LLaVA projector is a GELU MLP over the patch tokens (strategy 'default')")
    return text_dir, vision_dir, projector


def hf2gguf_main(argv) -> int:
    """Internal (run with the llama.cpp tree on PYTHONPATH): convert_hf_to_gguf.py, with an unknown
    BPE pre-tokenizer hash written as "default" (see the module docstring)."""
    import importlib.util

    root = Path(argv[0])
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            print("compare_llamacpp: BPE pre-tokenizer hash unknown; writing 'default' (byte-level, no merges)",
                  file=sys.stderr)
            return "default"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    # llama.cpp's BPE vocabulary needs a merges list and GGUF cannot store an empty one: a vocabulary
    # without merges gets one inert merge of two special tokens. BPE starts from single characters
    # and no other merge exists, so "<s>" is never a symbol and the merge never applies to any text.
    import gguf

    add_to_gguf = gguf.SpecialVocab.add_to_gguf

    def add_with_inert_merge(self, gw, quiet=False):
        if self.load_merges and not self.merges:
            print("compare_llamacpp: no BPE merges; writing one inert merge '<s> </s>'", file=sys.stderr)
            self.merges = ["<s> </s>"]
        return add_to_gguf(self, gw, quiet)

    gguf.SpecialVocab.add_to_gguf = add_with_inert_merge
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", root / "convert_hf_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = ["convert_hf_to_gguf.py", *argv[1:]]
    module.main()
    return 0


def clip2gguf_main(argv) -> int:
    """Internal: llama.cpp's CLIP-LLaVA converter, which expects transformers 4.x's CLIPVisionModel
    (the tower under `.vision_model`); transformers 5 keeps the tower at the top, so it is wrapped."""
    import runpy

    import torch
    import transformers

    loader = transformers.CLIPVisionModel.from_pretrained.__func__

    class Wrapped(torch.nn.Module):
        def __init__(self, tower):
            super().__init__()
            self.vision_model = tower

    def from_pretrained(cls, *a, **kw):
        model = loader(cls, *a, **kw)
        return model if hasattr(model, "vision_model") else Wrapped(model)

    transformers.CLIPVisionModel.from_pretrained = classmethod(from_pretrained)
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_path(argv[0], run_name="__main__")
    return 0


#: what the CLIP-LLaVA converter writes in f16 whatever --use-f32 says, and where the f32 weights are
F16_ANYWAY = {"mm.0.weight": "multi_modal_projector.linear_1.weight", "mm.2.weight": "multi_modal_projector.linear_2.weight",
              "v.patch_embd.weight": "vision_tower.embeddings.patch_embedding.weight"}


def rewrite_f32(path: Path, model, env) -> list[str]:
    """Rewrite the mmproj GGUF with F16_ANYWAY's tensors in f32, from the checkpoint (the same weights
    as ours, not f16-rounded ones); every other key and tensor copied as it is."""
    sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])
    import gguf
    import numpy as np

    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    reader = gguf.GGUFReader(path)
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    rewritten = []
    for t in reader.tensors:
        data = t.data
        if t.name in F16_ANYWAY and t.tensor_type == gguf.GGMLQuantizationType.F16:
            data = state[F16_ANYWAY[t.name]].detach().float().numpy().reshape(t.data.shape).astype(np.float32)
            rewritten.append(t.name)
        writer.add_tensor(t.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return rewritten


def convert(args) -> int:
    export_dir, out = Path(args.export_dir), Path(args.out)
    if not (export_dir / "manifest.json").is_file():
        raise InputError(f"{export_dir} is not a tops-export directory (no manifest.json)")
    out.mkdir(parents=True, exist_ok=True)
    tree = LlamaCppTree(args.llama_cpp)
    try:
        manifest, adapter = load_source(export_dir)
        work = Path(tempfile.mkdtemp(prefix="hf-parts-", dir=out))
        try:
            text_dir, vision_dir, projector = save_hf_parts(adapter, work)
            env = tree.env()
            text_file = f"text-{args.outtype}.gguf"
            print(f"converting the decoder -> {out / text_file}", file=sys.stderr)
            run([sys.executable, __file__, "_hf2gguf", tree.root, text_dir, "--outtype", args.outtype,
                 "--outfile", out / text_file], env, "convert_hf_to_gguf.py")
            print(f"converting the CLIP tower and projector -> {out / 'mmproj-f32.gguf'}", file=sys.stderr)
            proc = adapter.processor.image_processor
            run([sys.executable, __file__, "_clip2gguf", tree.legacy_clip, "-m", vision_dir, "--llava-projector", projector, "--output-dir", work,
                 "--clip-model-is-vision", "--use-f32", "--projector-type", "mlp",
                 "--image-mean", *map(str, proc.image_mean), "--image-std", *map(str, proc.image_std)],
                env, "convert_image_encoder_to_gguf.py")
            shutil.move(str(work / "mmproj-model-f32.gguf"), out / "mmproj-f32.gguf")
            rewritten = rewrite_f32(out / "mmproj-f32.gguf", adapter.model, env) if args.mmproj_f32 else []
        finally:
            shutil.rmtree(work, ignore_errors=True)
        spec_path = out / PEER_FILE
        old = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
        spec = {
            "text": text_file, "text_type": args.outtype, "mmproj": "mmproj-f32.gguf",
            "source": manifest["model"]["source"], "config_sha256": manifest["model"]["config_sha256"],
            "llama_cpp_tree": str(args.llama_cpp or os.environ.get("LLAMA_CPP_SRC")),
            "workarounds": [
                "llama.cpp #25817: vision_feature_layer=-2 in the vision config before converting",
                "byte-level BPE: unknown pre-tokenizer hash written as 'default', one inert merge '<s> </s>' "
                "(no merges; token ids are fed)",
                "transformers 5: the CLIP-LLaVA converter gets the tower wrapped as 4.x's CLIPVisionModel.vision_model",
            ] + ([f"mmproj: {', '.join(rewritten)} rewritten in f32 from the checkpoint (the converter writes them "
                  "in f16 even with --use-f32)"] if rewritten else []),
        }
        if old.get("mtmd_lib") and (out / old["mtmd_lib"]).is_dir():  # a fixed libmtmd built before stays
            spec["mtmd_lib"] = old["mtmd_lib"]
            spec["workarounds"].append(old.get("mtmd_fix", "llama.cpp #25814: libmtmd built with CLS first"))
            spec["mtmd_fix"] = old.get("mtmd_fix")
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        print(f"wrote {out / text_file}, {out / 'mmproj-f32.gguf'}, {spec_path}")
    finally:
        tree.close()
    return 0


# --- build-mtmd ------------------------------------------------------------------------------
def mtmd_sources(mtmd_dir: Path) -> list[str]:
    text = (mtmd_dir / "CMakeLists.txt").read_text()
    block = re.search(r"add_library\(mtmd(.*?)\)", text, re.S)
    if not block:
        raise TopsError(f"cannot find the mtmd sources in {mtmd_dir / 'CMakeLists.txt'}")
    return [s for s in block.group(1).split() if s.endswith(".cpp")]


def build_mtmd(args) -> int:
    """libmtmd from the llama.cpp tree with CLS before the patches (#25814), linked against the
    installed llama-cpp-python's libllama/libggml (or --lib-dir's: a build of the same tree)."""
    import importlib.util

    out = Path(args.gguf_dir)
    if not (out / PEER_FILE).is_file():
        raise InputError(f"{out} has no {PEER_FILE}: run `convert` first")
    if args.lib_dir:
        lib_dir = Path(args.lib_dir)
    else:
        require_llama_cpp("build-mtmd")
        lib_dir = Path(importlib.util.find_spec("llama_cpp").submodule_search_locations[0]) / "lib"
    tree = LlamaCppTree(args.llama_cpp)
    try:
        root, mtmd = tree.root, tree.root / "tools" / "mtmd"
        llava = mtmd / "models" / "llava.cpp"
        source = llava.read_text()
        if CLS_BUG not in source:
            raise TopsError(f"{llava} does not have the #25814 line (fixed already?); the bundled libmtmd is fine")
        build = out / "mtmd-fix" / "build"
        build.mkdir(parents=True, exist_ok=True)
        patched = build / "llava.cpp"
        if not patched.is_file() or patched.read_text() != source.replace(CLS_BUG, CLS_FIX):
            patched.write_text(source.replace(CLS_BUG, CLS_FIX))
        # the flags of llama-cpp-python's own build of mtmd (CMake, Release, shared)
        includes = [f"-I{p}" for p in (mtmd, root / "include", root / "ggml" / "include", root / "vendor")]
        defines = ["-DGGML_BACKEND_SHARED", "-DGGML_SHARED", "-DGGML_USE_CPU", "-DLLAMA_BUILD", "-DLLAMA_SHARED",
                   "-DMTMD_VIDEO", "-Dmtmd_EXPORTS"]
        jobs, objects = [], []
        sources = [(rel, patched if rel == "models/llava.cpp" else mtmd / rel, (mtmd / rel).parent)
                   for rel in mtmd_sources(mtmd)]
        sources += [(f"vendor/{rel}", root / "vendor" / rel, (root / "vendor" / rel).parent) for rel in
                    ("hash/hash.cpp", "hash/xxhash/xxhash.c", "hash/sha1/sha1.c", "hash/sha256/sha256.c")
                    if (root / "vendor" / rel).is_file()]
        for rel, src, here in sources:
            obj = build / (rel.replace("/", "__") + ".o")
            objects.append(obj)
            if obj.is_file() and obj.stat().st_mtime >= src.stat().st_mtime:
                continue  # compiled by an earlier run
            if rel == "vendor/hash/sha1/sha1.c":  # vendor-hash builds this one as C++ (-x c++ -w), the other .c as C
                jobs.append(["g++", "-x", "c++", "-w", *includes, f"-I{root / 'vendor' / 'hash'}", f"-I{here}", "-O3",
                             "-DNDEBUG", "-fPIC", "-c", src, "-o", obj])
            elif src.suffix == ".c":
                jobs.append(["gcc", "-w", *includes, f"-I{root / 'vendor' / 'hash'}", f"-I{here}", "-O3", "-DNDEBUG",
                             "-fPIC", "-c", src, "-o", obj])
            else:
                jobs.append(["g++", *defines, *includes, f"-I{here}", "-O3", "-DNDEBUG", "-fPIC", "-std=gnu++17",
                             "-Wno-cast-qual", "-c", src, "-o", obj])
        print(f"compiling {len(jobs)} of {len(objects)} files with {args.jobs} jobs", file=sys.stderr)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: run(c, dict(os.environ), f"compiling {Path(str(c[-3])).name}"), jobs))
        if not (lib_dir / "libllama.so").exists():
            raise InputError(f"{lib_dir} has no libllama.so to link against (the objects are kept in {build})")
        lib = out / "mtmd-fix" / "libmtmd.so"
        libs = sorted({p.name.split(".so")[0][3:] for p in lib_dir.glob("libggml*.so*")})
        run(["g++", "-shared", "-o", lib, *objects, f"-L{lib_dir}", "-lllama", *[f"-l{n}" for n in libs],
             f"-Wl,-rpath,{lib_dir}", "-Wl,-soname,libmtmd.so", "-lpthread"], dict(os.environ), "linking libmtmd.so")
        if not args.keep_objects:
            shutil.rmtree(build, ignore_errors=True)
        spec_path = out / PEER_FILE
        spec = json.loads(spec_path.read_text())
        spec["mtmd_lib"] = "mtmd-fix"
        spec["mtmd_fix"] = ("llama.cpp #25814 (fix: PR #25844): libmtmd rebuilt with the CLS embedding before the patches "
                            f"(tools/mtmd/models/llava.cpp: {CLS_FIX})")
        spec["workarounds"] = [w for w in spec.get("workarounds", []) if "#25814" not in w] + [spec["mtmd_fix"]]
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        print(f"wrote {lib}; {spec_path} now names it")
    finally:
        tree.close()
    return 0


# --- check -----------------------------------------------------------------------------------
def check(args) -> int:
    import numpy as np

    from tops_edge.bench.llamacpp import PeerProcess, load_peer_files
    from tops_edge.bench.runner import build_prompt, synthetic_image
    from tops_edge.runtime import Pipeline
    from tops_edge.runtime.preprocess import load_image

    spec = load_peer_files(args.gguf_dir)
    pipe = Pipeline.load(args.export_dir)
    image = load_image(synthetic_image() if args.image is None else args.image)
    prompt, _ = build_prompt(pipe.pre.tokenizer, args.prompt_len)
    before, after = pipe.pre.split_ids(pipe.pre.prompt_text(prompt))
    pixels, size = pipe.pre.image_inputs(image)
    token_map = pipe.layout.token_map(size)
    ours_features = pipe.vision.run(pipe.layout.vision_feeds(pixels, size, token_map))["image_features"][0]
    n = token_map.selectable
    ours = pipe.generate(image, prompt, max_new_tokens=args.new_tokens, keep=n, ignore_eos=True).token_ids
    threads = int(os.environ.get("TOPS_EDGE_THREADS", "0")) or os.cpu_count() or 1
    options = {}
    for item in args.peer_option:
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    with PeerProcess(spec, threads=threads, n_ctx=len(before) + n + len(after) + args.new_tokens, options=options) as peer:
        peer.set_image(image)
        with tempfile.TemporaryDirectory() as tmp:
            embd_path = os.path.join(tmp, "embd.npy")
            result = peer.generate(before, after, args.new_tokens, embd_out=embd_path)
            theirs_features = np.load(embd_path)
        decoder_only = peer.generate_from_features(before, after, ours_features, args.new_tokens)
    diff = float(np.abs(theirs_features - ours_features).max()) if theirs_features.shape == ours_features.shape else None
    same = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731
    report = {
        "gguf": spec["dir"], "export": str(Path(args.export_dir).resolve()), "mtmd_lib": spec.get("mtmd_lib", "bundled"),
        "prompt_tokens": result["prompt_tokens"], "image_tokens": result["image_tokens"],
        "image_embd_max_abs_diff": diff, "image_embd_max_abs": float(np.abs(ours_features).max()),
        "tokens_equal": same(ours, result["token_ids"]), "decoder_on_our_features_tokens_equal": same(ours, decoder_only),
        "new_tokens": args.new_tokens, "options": options,
    }
    print(json.dumps(report, indent=2) if args.json else
          f"image embeddings: max |llama.cpp - ours| = {diff} (max |ours| {report['image_embd_max_abs']:.3g}); "
          f"greedy tokens equal: {report['tokens_equal']}/{args.new_tokens} (whole path), "
          f"{report['decoder_on_our_features_tokens_equal']}/{args.new_tokens} (llama.cpp's decoder on our embeddings); "
          f"libmtmd: {report['mtmd_lib']}")
    if diff is not None and diff > 1e-2 and not spec.get("mtmd_lib"):
        print("note: the bundled libmtmd has llama.cpp #25814 (CLS after the patches): its features differ at the "
              "same cost; `build-mtmd` builds one with the fix", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="the export's source model -> text and mmproj GGUFs + peer.json")
    c.add_argument("export_dir")
    c.add_argument("--out", required=True, help="folder for the GGUFs and peer.json")
    c.add_argument("--outtype", default="f32", choices=("f32", "f16"), help="the decoder's weights (default: f32, as the export)")
    c.add_argument("--llama-cpp", default=None, help="llama-cpp-python's sdist (.tar.gz) or a llama.cpp tree (default: $LLAMA_CPP_SRC)")
    c.add_argument("--converter-f16", dest="mmproj_f32", action="store_false",
                   help="keep the projector and patch convolution in f16 as the CLIP-LLaVA converter writes them "
                        "(default: rewritten in f32, the same weights as the export)")
    b = sub.add_parser("build-mtmd", help="libmtmd with the fix of llama.cpp #25814 (CLS first), named in peer.json")
    b.add_argument("gguf_dir")
    b.add_argument("--llama-cpp", default=None, help="the same llama.cpp tree the installed llama-cpp-python was built from")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b.add_argument("--lib-dir", default=None, help="libllama/libggml to link against (default: the installed llama-cpp-python's)")
    b.add_argument("--keep-objects", action="store_true", help="keep the compiled objects (a later run recompiles only what changed)")
    k = sub.add_parser("check", help="llama.cpp against ours on one image and prompt")
    k.add_argument("gguf_dir")
    k.add_argument("export_dir")
    k.add_argument("--new-tokens", type=int, default=64)
    k.add_argument("--prompt-len", type=int, default=32)
    k.add_argument("--image", default=None)
    k.add_argument("--json", action="store_true")
    k.add_argument("--peer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="llama.cpp option as for tops-bench (e.g. flash_attn=off, kv_type=f32)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_hf2gguf"]:
        return hf2gguf_main(argv[1:])
    if argv[:1] == ["_clip2gguf"]:
        return clip2gguf_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return {"convert": convert, "build-mtmd": build_mtmd, "check": check}[args.command](args)
    except TopsError as exc:
        print(f"compare_llamacpp: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
