"""The ShapesVQA training script's machinery (a seconds-long smoke run; accuracy is not its job)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_shapes_llava.py"
#: the committed ShapesVQA checkpoint (the built-in `shapes-llava`)
COMMITTED = ROOT / "tops_edge" / "assets" / "shapes-llava"


def _script():
    spec = importlib.util.spec_from_file_location("train_shapes_llava", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patch_labels_mark_each_objects_patches():
    from tops_edge.eval import shapes

    train = _script()
    scene = shapes.scene("train", 3)
    labels = train.patch_labels(scene)
    for o in scene.objects:  # the patch under each object's centre carries its classes
        i = (o.y // 14) * 24 + o.x // 14
        assert labels["colour"][i] == 1 + train.COLOURS.index(o.colour)
        assert labels["shape"][i] == 1 + train.SHAPE_NAMES.index(o.shape)
    assert (labels["colour"] == 0).mean() > 0.5  # mostly background


def test_folding_the_standardisation_keeps_the_projector_output():
    train = _script()
    model, _ = train.build_model(0, 2, 1, 32, 2)
    feats = torch.randn(2, 576, 64) * 3 + 1
    mean, std = feats.flatten(0, 1).mean(0), feats.flatten(0, 1).std(0)
    before = model.model.multi_modal_projector((feats - mean) / std)
    train.fold_standardisation(model, mean, std)
    torch.testing.assert_close(model.model.multi_modal_projector(feats), before, rtol=1e-4, atol=1e-4)


def test_smoke_training_saves_a_model_that_exports_and_evaluates(tmp_path):
    from tops_edge.eval import run_eval
    from tops_edge.export import export_model

    train = _script()
    assert train.main(["--smoke", "--out", str(tmp_path / "run"), "--threads", "1"]) == 0
    model_dir = tmp_path / "run" / "model"
    assert json.loads((model_dir / "TRAINING.json").read_text())["lm_steps"] >= 1
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    out = export_model(str(model_dir), tmp_path / "export", selector="dpp-merge", keep=64, progress=False)
    report = run_eval(out, keeps=[64], selectors=["dpp-merge", "uniform"], limit=6, max_new_tokens=2)
    assert report["settings"]["items"] == 6 and report["table"]["dpp-merge"]["64"]["all"]["n"] == 6
    first = json.loads((model_dir / "TRAINING.json").read_text())
    # resuming continues the step count, stops at --lm-steps, and keeps the chain of commands
    assert train.main(["--smoke", "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "run" / "checkpoint.pt"),
                       "--threads", "1", "--lm-steps", str(first["lm_steps"] + 1)]) == 0
    info = json.loads((model_dir / "TRAINING.json").read_text())
    assert info["lm_steps"] == first["lm_steps"] + 1
    assert [h["lm_steps"] for h in info["history"]] == [first["lm_steps"], first["lm_steps"] + 1]
    assert "--resume" not in info["history"][0]["command"] and "--lm-steps" in info["history"][1]["command"]
    # the training curve reads the log the two runs appended to
    curves = _plot().curves(tmp_path / "run" / "log.jsonl")
    assert curves and all(steps == sorted(steps) for steps in ([s for s, _ in v] for v in curves.values()))


def _plot():
    spec = importlib.util.spec_from_file_location("plot_training", SCRIPT.with_name("plot_training.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_combined_loss_adds_both_auxiliary_terms():
    train = _script()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    ys = torch.tensor([0, 0, 1])
    types = ["count", "aux:count", "aux:pope"]
    ce = torch.nn.functional.cross_entropy(logits, ys, reduction="none")
    loss, total = train.combined_loss(logits, ys, types, 0.5, torch.tensor(3.0), 0.1)
    assert torch.isclose(loss, ce[0])
    assert torch.isclose(total, ce[0] + 0.5 * ce[1:].mean() + 0.3)
    assert torch.isclose(train.combined_loss(logits, ys, types, 0.0, None, 0.0)[1], ce[0])


# --- two tasks, and a deeper Llama grown from a trained model ----------------------------------
def _first_turn_logits(model_dir, scene, question):
    """The HF model in `model_dir` on one scene's first turn, as tops-eval asks it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tops_edge.eval.tasks import SUFFIX

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{question}\n{SUFFIX['short']}"}]}]
    inputs = processor(images=scene.image(), text=processor.apply_chat_template(conv, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits, inputs["input_ids"], model.config


def test_smoke_training_on_both_tasks_logs_each_tasks_types(tmp_path):
    from tops_edge.eval import shapes, shapes_dense

    train = _script()
    assert train.main(["--smoke", "--out", str(tmp_path / "run"), "--threads", "1", "--lm-steps", "2",
                       "--tasks", "shapesvqa,shapesvqa-dense"]) == 0
    info = json.loads((tmp_path / "run" / "model" / "TRAINING.json").read_text())
    assert info["tasks"] == ["shapesvqa", "shapesvqa-dense"] and info["lm_steps"] == 2
    val = [json.loads(line)["val"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
           if json.loads(line).get("stage") == "lm" and "val" in json.loads(line)]
    expected = set(shapes.QUESTION_TYPES) | {"dense/" + t for t in shapes_dense.QUESTION_TYPES}
    assert val and set(val[-1]) <= expected and len(set(val[-1]) - set(shapes.QUESTION_TYPES)) >= 4
    assert {t for t in val[-1] if not t.startswith("dense/")} >= set(shapes.QUESTION_TYPES) - {"colour_of_shape"}
    # the saved tokenizer has every word of both tasks
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    for _, q in shapes_dense.questions("val", 40):
        assert tok.unk_token_id not in tok(q.question + " " + q.answer)["input_ids"], q


def test_dense_patch_labels_mark_each_objects_patches():
    from tops_edge.eval import shapes_dense

    train = _script()
    scene = shapes_dense.scene("train", 3)
    labels = train.patch_labels(scene)
    for o in scene.objects:
        i = (o.y // 14) * 24 + o.x // 14
        assert labels["colour"][i] == 1 + train.COLOURS.index(o.colour)
        assert labels["shape"][i] == 1 + train.SHAPE_NAMES.index(o.shape)
        assert labels["size"][i] == 1 + train.SIZE_NAMES.index("small")


def test_vocabulary_extension_keeps_old_token_ids():
    from transformers import AutoTokenizer

    from tops_edge.eval import shapes, shapes_dense

    train = _script()
    assert train.vocabulary() == train.vocabulary(("shapesvqa",))  # the default vocabulary is today's
    from tops_edge.models.tiny import build_word_tokenizer

    # the committed model's own tokenizer as it was saved, or (without it) the one a fresh run builds
    old = AutoTokenizer.from_pretrained(COMMITTED) if COMMITTED else build_word_tokenizer(train.vocabulary())
    old_tokens = train.tokens_of(old)
    assert train.grown_vocabulary(old_tokens, ("shapesvqa",)) == old_tokens  # ShapesVQA's words: all there already
    tokens = train.grown_vocabulary(old_tokens, ("shapesvqa", "shapesvqa-dense"))
    assert tokens[:len(old_tokens)] == old_tokens and set(tokens[len(old_tokens):]) == {"above", "shapes"}
    new = train.word_tokenizer(tokens)
    assert train.tokens_of(new) == tokens
    texts = [q.question + " " + q.answer for _, q in shapes.questions("val", 60)]
    texts.append("USER: <image>\nWhat color is the circle?\nAnswer the question using a single word or phrase. ASSISTANT:")
    for text in texts:  # ShapesVQA text: the same ids from the grown vocabulary as from the old one
        assert new(text)["input_ids"] == old(text)["input_ids"], text
    for _, q in shapes_dense.questions("val", 40):
        ids = new(q.question + " " + q.answer)["input_ids"]
        assert new.unk_token_id not in ids
    assert new("shapes above")["input_ids"][1:] == [tokens.index("shapes"), tokens.index("above")]
    assert (new.eos_token_id, new.pad_token_id, new.bos_token_id) == (old.eos_token_id, old.pad_token_id, old.bos_token_id)


def test_grown_layers_start_as_the_identity():
    train = _script()
    model, _ = train.build_model(0, 2, 2, 32, 2)
    model.eval()
    with torch.no_grad():  # a trained model has non-zero everything; make the random one so too
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    grown = train.grow(model, 3, model.config.text_config.vocab_size + 2)
    assert train.layer_sources(2, 3) == [(0, False), (0, True), (1, False), (1, True), (1, True)]
    layers = grown.model.language_model.layers
    assert len(layers) == 5 and grown.config.text_config.num_hidden_layers == 5
    for index, (source, new) in enumerate(train.layer_sources(2, 3)):
        assert torch.equal(layers[index].self_attn.q_proj.weight,
                           model.model.language_model.layers[source].self_attn.q_proj.weight)
        assert bool((layers[index].self_attn.o_proj.weight == 0).all()) == new
        assert bool((layers[index].mlp.down_proj.weight == 0).all()) == new
    image = model.config.image_token_id
    ids = torch.tensor([[1] + [image] * 576 + [20, 30, 9, 13, 8]])  # the processor's expansion of <image>
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
        after = grown(input_ids=ids, pixel_values=pixels).logits
    vocab = before.shape[-1]
    torch.testing.assert_close(after[..., :vocab], before, rtol=0, atol=1e-5)
    # the new tokens: embedding and LM-head rows at the mean of the old ones
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        old_rows, rows = model.state_dict()[name], grown.state_dict()[name]
        assert torch.equal(rows[:vocab], old_rows)
        torch.testing.assert_close(rows[vocab:], old_rows.mean(0).expand(2, -1))
    assert (after[..., vocab:] <= after[..., :vocab].max(-1, keepdim=True).values).all()  # never the argmax


def test_growing_the_committed_checkpoint_keeps_its_logits_then_resumes(tmp_path):
    from tops_edge.eval import shapes

    assert COMMITTED is not None, "the committed shapes-llava checkpoint is missing"
    train = _script()
    run = tmp_path / "run"
    # no stage-2 step: the saved model is the committed one grown (its standardisation unfolded and folded again)
    assert train.main(["--smoke", "--out", str(run), "--threads", "1", "--init-from", str(COMMITTED),
                       "--grow-layers", "6", "--tasks", "shapesvqa,shapesvqa-dense", "--lm-steps", "0"]) == 0
    info = json.loads((run / "model" / "TRAINING.json").read_text())
    assert info["lm_steps"] == 0 and info["vision_steps"] == info["parent"]["vision_steps"] > 0
    assert info["parent"]["text_layers"] == 2 and info["parent"]["added_tokens"] == ["above", "shapes"]
    init = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["logit_change"] for r in init if r.get("stage") == "init"][0] <= 1e-5
    assert not [r for r in init if r.get("stage") == "vision"]  # stage 1 skipped: the tower is the checkpoint's
    scene = shapes.scene("val", 2)
    before, ids, _ = _first_turn_logits(COMMITTED, scene, "What shape is the red object?")
    after, grown_ids, config = _first_turn_logits(run / "model", scene, "What shape is the red object?")
    assert config.text_config.num_hidden_layers == 8 and torch.equal(ids, grown_ids)
    torch.testing.assert_close(after[..., :before.shape[-1]], before, rtol=0, atol=1e-5)
    start = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    tower = {k: v for k, v in start.items() if k.startswith("model.vision_tower.")}
    # one step on: the resumed run is the grown model (8 layers, the grown vocabulary), the tower unchanged
    assert train.main(["--smoke", "--out", str(run), "--threads", "1", "--resume", str(run / "checkpoint.pt"),
                       "--lm-steps", "1"]) == 0
    info = json.loads((run / "model" / "TRAINING.json").read_text())
    assert info["lm_steps"] == 1 and info["tasks"] == ["shapesvqa", "shapesvqa-dense"]
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(resumed[k], v) for k, v in tower.items())
    assert not torch.equal(resumed["model.language_model.layers.1.self_attn.o_proj.weight"],
                           start["model.language_model.layers.1.self_attn.o_proj.weight"])  # the new layer learns
    _, _, config = _first_turn_logits(run / "model", scene, "How many red shapes are there?")
    assert config.text_config.num_hidden_layers == 8 and config.text_config.vocab_size == 63


def test_bad_grow_arguments_are_refused(tmp_path, capsys):
    import pytest

    train = _script()
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--out", str(tmp_path / "a"), "--grow-layers", "2"])  # nothing to grow
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--out", str(tmp_path / "b"), "--tasks", "shapesvqa,mmlu"])
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--out", str(tmp_path / "c"), "--init-from", str(tmp_path)])  # no config.json
    capsys.readouterr()


def test_tune_tower_trains_the_inherited_tower_before_stage_2(tmp_path):
    train = _script()
    run = tmp_path / "run"
    assert train.main(["--smoke", "--out", str(run), "--threads", "1", "--init-from", str(COMMITTED),
                       "--tasks", "shapesvqa,shapesvqa-dense", "--tune-tower", "1", "--lm-steps", "0"]) == 0
    info = json.loads((run / "model" / "TRAINING.json").read_text())
    assert info["parent"]["tower_tuned_minutes"] == 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("stage") == "vision" and "val" in r]  # stage 1 ran on the inherited tower
    assert info["vision_steps"] > info["parent"]["vision_steps"]
    from safetensors.torch import load_file

    before, after = load_file(COMMITTED / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    tower = [k for k in before if "vision_tower." in k and k.endswith("q_proj.weight")]
    assert tower and all(k in after for k in tower)
    assert not all(torch.equal(before[k], after[k]) for k in tower)  # the tower moved


def test_tune_tower_needs_init_from(tmp_path, capsys):
    import pytest

    train = _script()
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--out", str(tmp_path / "a"), "--tune-tower", "5"])
    assert "--tune-tower" in capsys.readouterr().err


# --- LLaVA-NeXT (--next): a trained LLaVA-1.5 converted to anyres, trained on shapesvqa-wide ----------
def _tiny_llava15(train, directory, perturb: bool = False):
    """A small random LLaVA-1.5 of the script's architecture saved in HF format (what --init-from reads)."""
    model, processor = train.build_model(0, 2, 1, 32, 2, ("shapesvqa",))
    if perturb:  # a trained model has non-zero everything; make the random one so too
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def test_anyres_crops_and_their_patch_labels_match_the_processor():
    import numpy as np
    import pytest
    from PIL import Image

    from tops_edge.eval import shapes_dense, shapes_wide

    train = _script()
    model, processor = train.build_model(0, 2, 1, 32, 2, ("shapesvqa",))
    _, nproc = train.to_next(model, processor)
    bank = train.AnyresBank(nproc, "val", 2, lambda *a, **k: None, ("shapesvqa-wide", "shapesvqa-dense"))
    assert bank.num_crops == [3, 3, 2, 2] and bank.image_sizes == [(336, 672), (672, 336), (336, 336), (336, 336)]
    assert len(bank.labels["colour"]) == 10 and list(bank.crops(1)) == [3, 4, 5]
    pixels = torch.cat(list(bank.pixel_batches(4)))
    assert pixels.shape == (10, 3, 336, 336)
    # a wide scene's crops 1 and 2 are its left and right halves, a tall one's its top and bottom
    for i, tiles in ((0, [(slice(None), slice(0, 336)), (slice(None), slice(336, 672))]),
                     (1, [(slice(0, 336), slice(None)), (slice(336, 672), slice(None))])):
        image = np.asarray(bank.scenes[i].image())
        for c, (rows, cols) in enumerate(tiles, 1):
            tile = nproc.image_processor(images=Image.fromarray(image[rows, cols]), return_tensors="pt")["pixel_values"][0, 0]
            torch.testing.assert_close(pixels[int(bank.crop_start[i]) + c], tile)
    # on a 336 scene both crops (base view and the one tile) carry exactly LLaVA-1.5's patch labels
    labels = train.patch_labels(shapes_dense.scene("val", 0))
    for c in (6, 7):
        for k in labels:
            assert np.array_equal(bank.labels[k][c].numpy(), labels[k]), k
    # a wide scene: each object's centre patch in its tile, and in the base view (a patch there is 28 x 14 px)
    scene = shapes_wide.scene("val", 0)
    for o in scene.objects:
        tile = 1 + o.x // 336
        i = (o.y // 14) * 24 + (o.x % 336) // 14
        assert bank.labels["colour"][tile, i] == 1 + train.COLOURS.index(o.colour)
        assert bank.labels["shape"][tile, i] == 1 + train.SHAPE_NAMES.index(o.shape)
        j = (o.y // 14) * 24 + o.x // 28
        assert bank.labels["colour"][0, j] in (0, 1 + train.COLOURS.index(o.colour))  # a thin object may miss 30%
    hit = [bool(bank.labels["colour"][0, (o.y // 14) * 24 + o.x // 28]) for o in scene.objects]
    assert np.mean(hit) > 0.8
    with pytest.raises(ValueError, match="not a 1x1 grid"):
        train.crop_labels(scene, (1, 1))


def test_next_training_path_computes_what_hf_llava_next_computes(tmp_path):
    """The converted (untrained) NeXT model: the script's training forward (cached tower features per
    crop, standardised, HF's pack_image_features, the text spliced around it) gives the logits of
    LlavaNextForConditionalGeneration on the saved model and its processor, for wide, tall and square
    scenes batched together."""
    import argparse

    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    train = _script()
    torch.manual_seed(0)
    model, processor = _tiny_llava15(train, tmp_path / "v15", perturb=True)
    nxt, nproc = train.to_next(model, processor)
    assert type(nxt).__name__ == "LlavaNextForConditionalGeneration"
    assert nxt.config.image_grid_pinpoints == [[336, 336], [336, 672], [672, 336]]
    assert nxt.config.text_config.max_position_embeddings == 2048
    for name, value in model.state_dict().items():  # tower, projector and Llama: the LLaVA-1.5 weights
        assert torch.equal(nxt.state_dict()[name], value), name
    with torch.no_grad():
        nxt.model.image_newline.normal_()  # a newline that matters (to_next leaves zeros for init_newline)
    nxt.eval()
    log = lambda *a, **k: None  # noqa: E731
    bank = train.AnyresBank(nproc, "val", 2, log, ("shapesvqa-wide", "shapesvqa-dense"))
    cache = train.standardise_and_cache(nxt, {"train": bank}, log)
    mean, std = cache["mean"], cache["std"]
    with torch.no_grad():
        raw = torch.cat([train.tower_features(nxt, px) for px in bank.pixel_batches()])
    flat = raw.flatten(0, 1)
    torch.testing.assert_close(mean, flat.mean(0), rtol=1e-4, atol=1e-4)  # fp16 cache, float64 sums
    torch.testing.assert_close(std, flat.std(0), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cache["features"]["train"].float(), (raw - mean) / std, rtol=1e-2, atol=1e-2)
    feats = (raw - mean) / std  # fp32: the packing, not the fp16 cache, is what is compared to 1e-4
    train.unfold_standardisation(nxt, mean, std)  # as main() does: the projector reads standardised features
    train.save_hf(nxt, nproc, {"mean": mean, "std": std}, tmp_path / "next", argparse.Namespace(), "test")
    ref = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "next").eval()
    ref_processor = AutoProcessor.from_pretrained(tmp_path / "next")

    convs = train.Conversations(nproc)
    idx = list(range(len(bank)))
    seqs = [convs.build(bank.questions[i], [0]) for i in idx]

    def training_logits(newline=True):
        with torch.no_grad():
            images, projected, labels = train.visual_tokens(nxt, bank, feats, idx)
            if not newline:
                images, _ = nxt.model.pack_image_features(
                    torch.split(projected, bank.num_crops), torch.tensor(bank.image_sizes), "default", image_newline=None)
            x, mask, where = train._batch_from(nxt, convs, images, seqs)
            hidden = nxt.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
            return nxt.lm_head(hidden), train.lm_forward(nxt, x, mask, where)[0], where, projected, labels

    full, targets, (rows, cols, ys, _), projected, labels = training_logits()
    assert projected.shape[:2] == (10, 576) and labels["colour"].shape == (10, 576)
    for r, i in enumerate(idx):
        scene, q = bank.scenes[i], bank.questions[i][0]
        conv = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": f"{q.question}\n{train.SUFFIX['short']}"}]}]
        inputs = ref_processor(images=scene.image(), text=ref_processor.apply_chat_template(conv, add_generation_prompt=True),
                               return_tensors="pt")
        with torch.no_grad():
            hf = ref(**inputs).logits[0]
        ids = inputs["input_ids"][0].tolist()
        slot = ids.index(convs.image_id)
        n_img = ids.count(convs.image_id)
        # the same text; the image as many tokens as the training sequence has
        assert ids[:slot + 1] + ids[slot + n_img:] == convs.first_turn(q.question)
        assert n_img == len(train.visual_tokens(nxt, bank, feats, [i])[0][0])
        assert n_img == {(336, 672): 1752, (672, 336): 1776, (336, 336): 1176}[bank.image_sizes[i]]
        torch.testing.assert_close(full[r, :len(ids)], hf, rtol=0, atol=1e-4)
        # the logits the loss reads for the answer's first token are HF's at the last prompt position
        first = int(torch.nonzero(rows == r)[0])
        assert int(cols[first]) == len(ids) - 1 and int(ys[first]) == convs.tok(q.answer, add_special_tokens=False)["input_ids"][0]
        torch.testing.assert_close(targets[first], hf[-1], rtol=0, atol=1e-4)
    # the comparison can fail: the same sequence without its newline tokens is not HF's
    wrong = training_logits(newline=False)[0]
    assert (wrong[0, :1700] - full[0, :1700]).abs().max() > 1e-3


def test_next_smoke_run_saves_a_llava_next_that_exports_answers_and_resumes(tmp_path):
    from tops_edge.eval import shapes_wide
    from tops_edge.eval.tasks import SUFFIX
    from tops_edge.export import export_model
    from tops_edge.models import load
    from tops_edge.models.llava_next import LlavaNextAdapter
    from tops_edge.runtime import Pipeline

    train = _script()
    _tiny_llava15(train, tmp_path / "v15")
    run = tmp_path / "run"
    assert train.main(["--smoke", "--out", str(run), "--threads", "1", "--next", "--init-from", str(tmp_path / "v15"),
                       "--lm-steps", "1"]) == 0
    model_dir = run / "model"
    info = json.loads((model_dir / "TRAINING.json").read_text())
    assert info["lm_steps"] == 1 and info["tasks"] == ["shapesvqa-wide"] and info["args"]["next"] is True
    assert "--next" in info["command"] and "--next" in info["history"][-1]["command"]
    assert info["parent"]["converted_to_next"]["image_grid_pinpoints"] == [[336, 336], [336, 672], [672, 336]]
    assert info["parent"]["added_tokens"] == ["above", "shapes"]  # shapesvqa-wide asks shapesvqa-dense's words
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llava_next"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("stage") == "init" and r.get("newline_norm", 0) > 0]  # the newline from the data
    val = [r["val"] for r in log if r.get("stage") == "lm" and "val" in r]
    assert val and set(val[-1]) <= {"wide/" + t for t in shapes_wide.QUESTION_TYPES}

    adapter = load(str(model_dir))
    assert isinstance(adapter, LlavaNextAdapter)
    layout = adapter.visual_layout()
    assert layout["layout"] == "anyres" and layout["max_crops"] == 3 and layout["max_tokens"] == 1776
    out = export_model(str(model_dir), tmp_path / "export", selector="uniform", keep=64, progress=False)
    pipe = Pipeline.load(out)
    for index, tokens in ((0, 1752), (1, 1776)):  # a wide scene, then a tall one
        scene = shapes_wide.scene("test", index)
        result = pipe.generate(scene.image(), f"What color is the circle?\n{SUFFIX['short']}", max_new_tokens=2, keep=64)
        assert result.num_visual_tokens == tokens and result.keep == 64 and sum(result.kept_sizes) == tokens
        assert 1 <= len(result.token_ids) <= 2

    # resuming: the checkpoint rebuilds the NeXT model (config, vocabulary, image processor) and goes on
    start = torch.load(run / "checkpoint.pt", weights_only=False)
    assert start["state"]["config"]["model_type"] == "llava_next" and "model.image_newline" in start["model"]
    assert start["state"]["image_processor"]["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert train.main(["--smoke", "--out", str(run), "--threads", "1", "--resume", str(run / "checkpoint.pt"),
                       "--lm-steps", "2"]) == 0
    info = json.loads((model_dir / "TRAINING.json").read_text())
    assert info["lm_steps"] == 2 and [h["lm_steps"] for h in info["history"]] == [1, 2]
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert not torch.equal(resumed["model.image_newline"], start["model"]["model.image_newline"])  # it trains
    tower = [k for k in resumed if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(resumed[k], start["model"][k]) for k in tower)  # frozen
    assert isinstance(load(str(model_dir)), LlavaNextAdapter)


def test_bad_next_arguments_are_refused(tmp_path, capsys):
    import pytest

    train = _script()
    cases = [
        (["--next"], "--next converts"),  # nothing to convert
        (["--tasks", "shapesvqa-wide"], "need a LLaVA-NeXT model"),  # LLaVA-1.5 sees 336x336
        (["--next", "--init-from", str(COMMITTED), "--tune-tower", "1"], "--tune-tower"),
        (["--init-from", str(COMMITTED), "--tasks", "shapesvqa-wide", "--lm-steps", "0"], "--next --init-from"),
    ]
    for n, (extra, message) in enumerate(cases):
        with pytest.raises(SystemExit) as err:
            train.main(["--smoke", "--out", str(tmp_path / str(n)), "--threads", "1"] + extra)
        assert err.value.code == 2  # argparse's usage error
        assert message in capsys.readouterr().err, extra
