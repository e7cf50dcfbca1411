#!/usr/bin/env bash
# Verify the TensorRT path on a TensorRT host: a CUDA GPU, tensorrt >= 10.8, polygraphy, a CUDA build
# of torch and triton (pip install -e ".[trt]"). NOT run on the development machines (no TensorRT).
#
#   bash scripts/verify_trt.sh [OUT_DIR]        DEVICE=orin-nx bash scripts/verify_trt.sh   (default: rtx)
#
# Exports tiny-llava twice (ORT form, and --target trt with the tops::Select plugin), builds fp16
# engines (int8 too when `tops-export --precision int8` exists), compares each part's engine with
# ONNX Runtime through polygraphy, runs the TRT pipeline against the ORT one, then does the same for a
# decoder exported in segments (fastv pruning inside the LLM), Qwen2.5-VL's and Qwen3-VL's dynamic image sizes,
# int4-wo engines (AWQ, RTN) and an LM head split in vocabulary chunks, and prints a pass/fail table.
set -uo pipefail
OUT=${1:-out/verify-trt}
DEVICE=${DEVICE:-rtx}
ROWS=()
FAILED=0
row() { ROWS+=("$(printf '%-52s %s' "$1" "$2")"); if [ "$2" = FAIL ]; then FAILED=1; fi; }
step() { local name=$1; shift; echo "== $name" >&2; if "$@"; then row "$name" PASS; else row "$name" FAIL; fi; }

python - <<'PY' || { echo "verify_trt: needs tensorrt, polygraphy, triton and torch with CUDA" >&2; exit 2; }
import tensorrt, polygraphy, triton, torch
assert torch.cuda.is_available(), "torch has no CUDA device"
print(f"tensorrt {tensorrt.__version__}, polygraphy {polygraphy.__version__}, triton {triton.__version__}, "
      f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}")
PY
rm -rf "$OUT" && mkdir -p "$OUT"

step "export tiny-llava (ORT form)" tops-export --model tiny-llava --out "$OUT/ort" --selector dpp-merge --keep 64 --quiet
step "export tiny-llava --target trt (plugin node)" tops-export --model tiny-llava --out "$OUT/trt" --selector dpp-merge --keep 64 --target trt --quiet
step "tops-build fp16 ($DEVICE)" tops-build "$OUT/trt" --device "$DEVICE" --precision fp16

PRECISIONS=(fp16)
if tops-export --model tiny-llava --out "$OUT/int8" --selector dpp-merge --keep 64 --target trt --precision int8 --quiet 2>"$OUT/int8.err"; then
  step "tops-build int8 ($DEVICE)" tops-build "$OUT/int8" --device "$DEVICE" --precision int8
  PRECISIONS+=(int8)
else
  row "tops-build int8 ($DEVICE)" "SKIP ($(head -c 120 "$OUT/int8.err"))"
fi

# Inputs per part, shaped by the manifest: one image, a prompt of 8 tokens, an empty KV cache, K = 64.
step "make inputs" python - "$OUT" <<'PY'
import json, sys
import numpy as np
from polygraphy.json import save_json
out = sys.argv[1]
m = json.load(open(f"{out}/trt/manifest.json"))
sizes = {"num_images": 1, "batch": 1, "instruction": 8, "sequence": 8, "cache_sequence": 8}  # a prefill filling the cache
g = np.random.default_rng(0)
for part, rec in m["parts"].items():
    feeds = {}
    for spec in rec["inputs"]:
        shape = [d if isinstance(d, int) else sizes[d] for d in spec["shape"]]
        if spec["name"] == "keep":
            feeds["keep"] = np.array(64, dtype=np.int64)
        elif spec["dtype"] == "int64":
            feeds[spec["name"]] = (np.ones(shape) if "mask" in spec["name"] else g.integers(5, 200, shape)).astype(np.int64)
            if spec["name"] == "position_ids":
                feeds[spec["name"]] = np.arange(shape[-1], dtype=np.int64)[None]
            if spec["name"] == "cache_position":
                feeds[spec["name"]] = np.arange(shape[-1], dtype=np.int64)
        else:
            feeds[spec["name"]] = g.standard_normal(shape).astype(np.float32)
    save_json([feeds], f"{out}/inputs_{part}.json")
PY

for prec in "${PRECISIONS[@]}"; do
  dir=$OUT/trt; [ "$prec" = int8 ] && dir=$OUT/int8
  for part in vision embed decoder; do
    engine=$(python -c "import json,sys; print(json.load(open('$dir/engines.json'))['engines']['$part']['path'])" 2>/dev/null) || { row "polygraphy $part $prec vs ORT" FAIL; continue; }
    polygraphy run "$OUT/ort/$part.onnx" --onnxrt --load-inputs "$OUT/inputs_$part.json" --save-outputs "$OUT/ort_$part.json" >"$OUT/poly_ort_$part.log" 2>&1
    step "polygraphy $part $prec vs ORT" polygraphy run "$dir/$engine" --model-type engine --trt --load-inputs "$OUT/inputs_$part.json" \
      --load-outputs "$OUT/ort_$part.json" --atol 2e-2 --rtol 2e-2
  done
done

# The selector engine holds tops::Select, which polygraphy's CLI cannot register: compare through its API.
step "selector engine (tops::Select) == ORT selector" python - "$OUT" <<'PY'
import json, sys
import numpy as np
from polygraphy.backend.common import BytesFromPath
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.backend.trt import EngineFromBytes, TrtRunner
from polygraphy.json import load_json
import tops_edge.plugins
tops_edge.plugins.load()
out = sys.argv[1]
feeds = load_json(f"{out}/inputs_selector.json")[0]
engine = json.load(open(f"{out}/trt/engines.json"))["engines"]["selector"]["path"]
ok = True
for keep in (1, 64, 576):
    feeds["keep"] = np.array(keep, dtype=np.int64)
    with OnnxrtRunner(SessionFromOnnx(f"{out}/ort/selector.onnx")) as ort, TrtRunner(EngineFromBytes(BytesFromPath(f"{out}/trt/{engine}"))) as trt:
        a, b = ort.infer(feeds), trt.infer(feeds)
        same = (np.array_equal(a["kept_indices"], b["kept_indices"]) and np.allclose(a["selected_features"], b["selected_features"])
                and np.array_equal(a["kept_sizes"], b["kept_sizes"]) and np.array_equal(a["token_groups"], b["token_groups"])
                and np.allclose(a["merged_features"], b["merged_features"], atol=1e-4, rtol=1e-4))
        print(f"K={keep}: kept indices, sizes, groups and merged features equal: {same}")
        ok &= same
sys.exit(0 if ok else 1)
PY

step "TRT pipeline tokens agree with ORT (>= 90%)" python - "$OUT" <<'PY'
import sys
from tops_edge.runtime import Pipeline
out = sys.argv[1]
ort, trt = Pipeline.load(f"{out}/ort"), Pipeline.load(f"{out}/trt", backend="trt")
same = total = 0
kept_ok = True
for prompt in ["What shapes are in the picture?", "Describe the image.", "How many red circles are there?"]:
    a = ort.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
    b = trt.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
    kept_ok &= a.kept_indices == b.kept_indices
    same += sum(x == y for x, y in zip(a.token_ids, b.token_ids)); total += len(a.token_ids)
    print(f"{prompt!r}: kept equal {a.kept_indices == b.kept_indices}, tokens {a.token_ids[:6]} vs {b.token_ids[:6]}, "
          f"TRT prefill {b.timings_ms['prefill']:.2f} ms, decode {b.timings_ms['decode_per_token']:.2f} ms/token")
print(f"token agreement {same}/{total}")
sys.exit(0 if kept_ok and same >= 0.9 * total else 1)
PY

# A decoder in segments (tiny-llava-medium: 4 layers, fastv cutting at 2): every segment's engine, the
# in-LLM selector's, and the pipeline's stages and tokens against ORT on the same export.
step "export tiny-llava-medium --cuts 2 (fastv)" tops-export --model tiny-llava-medium --out "$OUT/cut" --selector fastv --keep 400 --quiet
step "tops-build fp16 segmented ($DEVICE)" tops-build "$OUT/cut" --device "$DEVICE" --precision fp16
step "TRT segmented pipeline == ORT (stages, >= 90% tokens)" python - "$OUT" <<'PY'
import sys
from tops_edge.runtime import Pipeline
out = sys.argv[1]
ort, trt = Pipeline.load(f"{out}/cut"), Pipeline.load(f"{out}/cut", backend="trt")
same = total = 0
stages_ok = True
for prompt in ["What shapes are in the picture?", "Describe the image."]:
    a = ort.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
    b = trt.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
    stages_ok &= a.stages == b.stages
    same += sum(x == y for x, y in zip(a.token_ids, b.token_ids)); total += len(a.token_ids)
    print(f"{prompt!r}: stages equal {a.stages == b.stages}, segment prefill ms {b.segment_prefill_ms}")
print(f"token agreement {same}/{total}")
sys.exit(0 if stages_ok and same >= 0.9 * total else 1)
PY

# The paper's TOPS (tiny-llava-medium: Stage I before the LLM, Stage II at cuts 2 and 3) as standard ONNX
# ops in TensorRT (no plugin: its greedy is a Loop): every stage's kept set and the tokens against ORT.
step "export tiny-llava-medium --selector tops --target trt" tops-export --model tiny-llava-medium --out "$OUT/tops" --selector tops --keep 64 --target trt --quiet
step "tops-build fp16 tops ($DEVICE)" tops-build "$OUT/tops" --device "$DEVICE" --precision fp16
step "TRT tops pipeline == ORT (three stages, >= 90% tokens)" python - "$OUT" <<'PY'
import sys
from tops_edge.runtime import Pipeline
out = sys.argv[1]
ort, trt = Pipeline.load(f"{out}/tops", backend="ort"), Pipeline.load(f"{out}/tops", backend="trt")
same = total = 0
stages_ok = True
for prompt in ["What shapes are in the picture?", "How many red circles are there?"]:
    a = ort.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
    b = trt.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
    stages_ok &= a.stages == b.stages and len(a.stages) == 3
    same += sum(x == y for x, y in zip(a.token_ids, b.token_ids)); total += len(a.token_ids)
    print(f"{prompt!r}: stages {[(s['layer'], s['keep']) for s in b.stages]}, equal {a.stages == b.stages}, "
          f"select {b.timings_ms['select']:.2f} ms")
print(f"token agreement {same}/{total}")
sys.exit(0 if stages_ok and same >= 0.9 * total else 1)
PY

# Qwen2.5-VL and Qwen3-VL (tiny-qwen2.5-vl, tiny-qwen3-vl): the vision engine's dynamic patch count
# (square, wide, tall images, one at the processor's max_pixels), M-RoPE's [3, 1, S] positions and
# Qwen3-VL's DeepStack input through the profiles, against ORT.
for QWEN in tiny-qwen2.5-vl tiny-qwen3-vl; do
step "export $QWEN (dpp-merge)" tops-export --model "$QWEN" --out "$OUT/$QWEN" --selector dpp-merge --keep 48 --quiet
step "tops-build fp16 $QWEN ($DEVICE)" tops-build "$OUT/$QWEN" --device "$DEVICE" --precision fp16
step "TRT $QWEN pipeline == ORT (4 sizes, >= 90% tokens)" python - "$OUT/$QWEN" <<'PY'
import sys
import numpy as np
from PIL import Image
from tops_edge.runtime import Pipeline
out = sys.argv[1]
ort, trt = Pipeline.load(out, backend="ort"), Pipeline.load(out, backend="trt")
cap = int(ort.manifest["visual"]["max_pixels"] ** 0.5)
same = total = 0
for w, h in [(224, 224), (384, 192), (160, 480), (cap, cap)]:
    image = Image.fromarray(np.random.default_rng(w + h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    a = ort.generate(image, "Describe the image.", max_new_tokens=16, ignore_eos=True)
    b = trt.generate(image, "Describe the image.", max_new_tokens=16, ignore_eos=True)
    same += sum(x == y for x, y in zip(a.token_ids, b.token_ids)); total += len(a.token_ids)
    print(f"{w}x{h}: {b.num_visual_tokens} tokens, kept equal {a.kept_indices == b.kept_indices}, vision {b.timings_ms['vision']:.2f} ms")
print(f"token agreement {same}/{total}")
sys.exit(0 if same >= 0.9 * total else 1)
PY
done

# int4-wo (AWQ and RTN: blocked INT4 DequantizeLinear, TensorRT's weight-only INT4) with the LM head
# split in 3 vocabulary chunks, and an fp16 export with the split head: each TRT pipeline against the
# ORT pipeline of the same export, and the split fp16 engine's tokens against the unsplit one's.
for METHOD in awq rtn; do
step "export tiny-llava int4-wo $METHOD, head in 3" tops-export --model tiny-llava --out "$OUT/int4-$METHOD" --selector dpp-merge --keep 64 \
     --precision int4-wo --int4-method "$METHOD" --lm-head-chunks 3 --quiet
step "tops-build int4-wo $METHOD ($DEVICE)" tops-build "$OUT/int4-$METHOD" --device "$DEVICE" --precision int8
done
step "export tiny-llava fp16, head in 3" tops-export --model tiny-llava --out "$OUT/fp16-split" --selector dpp-merge --keep 64 \
     --precision fp16 --lm-head-chunks 3 --quiet
step "tops-build fp16 split head ($DEVICE)" tops-build "$OUT/fp16-split" --device "$DEVICE" --precision fp16
step "TRT int4-wo / split head == ORT (>= 90% tokens)" python - "$OUT" <<'PY'
import sys
from tops_edge.runtime import Pipeline
out = sys.argv[1]
ok = True
pairs = [(f"{out}/int4-awq", f"{out}/int4-awq"), (f"{out}/int4-rtn", f"{out}/int4-rtn"),
         (f"{out}/fp16-split", f"{out}/fp16-split"), (f"{out}/trt", f"{out}/fp16-split")]  # last: unsplit vs split, both TRT
for a_dir, b_dir in pairs:
    a = Pipeline.load(a_dir, backend="ort" if a_dir == b_dir else "trt")
    b = Pipeline.load(b_dir, backend="trt")
    same = total = 0
    for prompt in ["What shapes are in the picture?", "Describe the image."]:
        x = a.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
        y = b.generate("examples/shapes.png", prompt, max_new_tokens=16, ignore_eos=True)
        same += sum(i == j for i, j in zip(x.token_ids, y.token_ids)); total += len(x.token_ids)
    print(f"{a_dir} vs {b_dir} (TRT): token agreement {same}/{total}")
    ok &= same >= 0.9 * total
sys.exit(0 if ok else 1)
PY

echo
printf '%-52s %s\n' "check" "result"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
