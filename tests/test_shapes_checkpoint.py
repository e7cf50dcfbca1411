"""The shipped ShapesVQA checkpoint (`--model shapes-llava`, tops_edge/assets/shapes-llava, see its
README.md): it is the file its sha256 names and is refused when it is not, it loads through the
built-in name, it really answers ShapesVQA (val split; tops-eval reports the test split), and the
README's main command answers its example question correctly at 64 of 576 visual tokens."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from cli_helpers import one_line_error
from tops_edge.errors import CorruptModelError
from tops_edge.models import checkpoint_dir, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHA256 = "afc002a6acf6a8905d6ccee8a11d5b72e3b38043fb8e3ddafac46ce6e3d6c75d"
#: every shipped checkpoint's weights (the deeper and the NeXT one are tested further in
#: test_shapes_deep_checkpoint.py and test_shapes_next_checkpoint.py)
SHIPPED = {"shapes-llava": SHA256,
           "shapes-llava-deep": "2183603454cb725084ea8811b73f1810614af3d288ad0da1a9d118585cd8d070",
           "shapes-llava-next": "1700fc76bb9b18139b102c926d38edf4e3299492801386d702d110a80d61bebc"}


def test_every_builtin_checkpoint_is_tested_here():
    from tops_edge.models import CHECKPOINTS

    assert set(CHECKPOINTS) == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_checkpoint_matches_its_sha256(name):
    folder = checkpoint_dir(name)
    assert folder == ROOT / "tops_edge" / "assets" / name
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == SHIPPED[name]
    sums = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert sums["model.safetensors"] == SHIPPED[name]
    assert (folder / "model.safetensors").stat().st_size < 20 * 2**20


def test_a_tampered_checkpoint_is_refused(tmp_path):
    copy = Path(shutil.copytree(checkpoint_dir("shapes-llava"), tmp_path / "shapes-llava"))
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CorruptModelError, match="model.safetensors does not match its sha256"):
        verify_checkpoint(copy, "shapes-llava")
    (copy / "model.safetensors").unlink()
    with pytest.raises(CorruptModelError, match="missing"):
        verify_checkpoint(copy, "shapes-llava")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_package_data_ships_the_checkpoint(name):
    """pyproject's package-data pattern covers every file of the checkpoint folder (a wheel would
    otherwise install a model without its weights or SHA256SUMS)."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tops_edge"]
    folder = ROOT / "tops_edge" / "assets" / name
    for file in folder.iterdir():
        rel = file.relative_to(ROOT / "tops_edge").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_checkpoint_records_the_commands_that_trained_it(name):
    info = json.loads((checkpoint_dir(name) / "TRAINING.json").read_text())
    assert info["history"] and all(h["command"].startswith("python scripts/train_shapes_llava.py") for h in info["history"])
    assert info["history"][-1]["lm_steps"] == info["lm_steps"]


@pytest.fixture(scope="module")
def shapes_pipe(tmp_path_factory):
    from tops_edge.export import export_model
    from tops_edge.runtime import Pipeline

    out = export_model("shapes-llava", tmp_path_factory.mktemp("shapes") / "export", selector="dpp-merge", keep=64,
                       progress=False)
    return Pipeline.load(out)


def test_builtin_name_is_recorded_as_the_source(shapes_pipe):
    assert shapes_pipe.manifest["model"]["source"] == "shapes-llava"


def test_checkpoint_exports_and_answers_val_questions(shapes_pipe):
    """Through the exported ONNX pipeline, unpruned: a model that had not learned the task would sit
    near chance (50% on yes/no, 20% on shapes); the checkpoint answers most of 36 val questions."""
    from tops_edge.eval.tasks import load_task, score

    items = load_task("shapesvqa", limit=36, split="val", types=["colour_exist", "shape_of_colour", "count"])
    hits = [score(it, shapes_pipe.generate(it.image, it.prompt, max_new_tokens=3, keep=576).text) for it in items]
    assert sum(hits) >= 30, f"{sum(hits)}/36"


def _main_commands() -> list[list[str]]:
    """The README's main-job commands, as argument lists (the code block under '## The main job')."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The main job", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(cmd) for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


def test_readme_main_command_answers_the_example_question_at_64_tokens(tmp_path, capsys, monkeypatch):
    """Runs the README's two commands as written (from the repository root, into a temporary `out/`):
    the export keeps 64 of 576 tokens, the answer is the scene's red object's shape, and the
    kept-patches picture is written."""
    from tops_edge import cli
    from tops_edge.eval.shapes import render

    export, run = _main_commands()
    assert export[0] == "tops-export" and run[0] == "tops-run"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    assert cli.export_main(export[1:] + ["--quiet"]) == 0
    capsys.readouterr()
    assert cli.run_main(run[1:]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "triangle"
    assert re.search(r"\[64/576 visual tokens", err)
    picture = tmp_path / run[run.index("--show-kept") + 1]
    assert picture.is_file() and picture.stat().st_size > 1000
    # the example scene is ShapesVQA's val scene 19: its red object is the triangle
    from tops_edge.eval.shapes import scene

    red = [o for o in scene("val", 19).objects if o.colour == "red"]
    assert [o.shape for o in red] == ["triangle"]
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(ROOT / "examples" / "scene.png").convert("RGB")),
                          np.asarray(render(scene("val", 19).objects)))


def test_a_missing_show_kept_folder_fails_before_the_model_runs(shapes_pipe, capsys):
    from tops_edge import cli

    code = cli.run_main([str(shapes_pipe.directory), "--image", str(ROOT / "examples" / "scene.png"),
                         "--prompt", "What shape is the red object?", "--show-kept", "/nonexistent/kept.png"])
    assert "does not exist" in one_line_error(capsys, code)
