"""The ShapesVQA training script's machinery (a seconds-long smoke run; accuracy is not its job)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_shapes_llava.py"


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
    out = export_model(str(model_dir), tmp_path / "export", selector="tops", keep=64, progress=False)
    report = run_eval(out, keeps=[64], selectors=["tops", "uniform"], limit=6, max_new_tokens=2)
    assert report["settings"]["items"] == 6 and report["table"]["tops"]["64"]["all"]["n"] == 6
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
