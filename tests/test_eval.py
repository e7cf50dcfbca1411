"""tops-eval: the ShapesVQA generator, LLaVA-style scoring, JSONL tasks, the report, run-time selector switching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import one_line_error
from tops_edge.cli import eval_main
from tops_edge.errors import InputError
from tops_edge.eval import format_table, shapes
from tops_edge.eval.runner import (
    agreement_cell,
    kl_comparison,
    kl_divergence,
    log_softmax,
    mcnemar_p,
    mean_interval,
    paired_difference,
    relative_interval,
    run_eval,
    summarize,
    versus,
    wilson,
)
from tops_edge.eval.tasks import Item, choice_letter, load_jsonl, load_task, normalize_short, score, yes_no

EXAMPLE_TASK = Path(__file__).resolve().parents[1] / "examples" / "task_example.jsonl"


# --- ShapesVQA --------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_splits_differ():
    assert shapes.scene("test", 5) == shapes.scene("test", 5)
    assert np.array_equal(np.asarray(shapes.scene("val", 3).image()), np.asarray(shapes.scene("val", 3).image()))
    train = {shapes.scene("train", i).objects for i in range(200)}
    test = {shapes.scene("test", i).objects for i in range(200)}
    assert not train & test


def test_every_answer_follows_from_the_scene():
    for index in range(300):
        s = shapes.scene("train", index)
        objs = s.objects
        assert shapes.MIN_OBJECTS <= len(objs) <= shapes.MAX_OBJECTS
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)
        for q in s.questions():
            words = q.question.rstrip("?").split()
            if q.qtype == "count":
                assert q.answer == shapes.NUMBERS[len(objs)]
            elif q.qtype == "colour_exist":
                assert (q.answer == "yes") == any(o.colour == words[3] for o in objs)
            elif q.qtype == "pope":
                assert (q.answer == "yes") == any((o.colour, o.shape) == (words[3], words[4]) for o in objs)
            elif q.qtype == "shape_of_colour":
                (match,) = [o for o in objs if o.colour == words[4]]
                assert q.answer == match.shape
            elif q.qtype == "colour_of_shape":
                (match,) = [o for o in objs if o.shape == words[4]]
                assert q.answer == match.colour
            elif q.qtype == "left_right":
                a = next(o for o in objs if (o.colour, o.shape) == (words[2], words[3]))
                b = next(o for o in objs if (o.colour, o.shape) == (words[7], words[8]))
                assert (q.answer == "yes") == (a.x < b.x)


def test_question_types_are_balanced_enough_to_measure():
    pairs = shapes.questions("test", 1200)
    by_type: dict[str, list[str]] = {}
    for _, q in pairs:
        by_type.setdefault(q.qtype, []).append(q.answer)
    assert set(by_type) == set(shapes.QUESTION_TYPES)
    for qtype, answers in by_type.items():
        assert len(answers) >= 150, qtype
        top = max(answers.count(a) for a in set(answers))
        assert top / len(answers) < 0.6, qtype  # no answer a majority: chance stays well below 90%


def test_the_rendered_objects_are_where_the_scene_says():
    s = shapes.scene("test", 7)
    pixels = np.asarray(s.image())
    for o in s.objects:
        assert tuple(pixels[o.y, o.x]) == shapes.COLOURS[o.colour]


# --- scoring ----------------------------------------------------------------------------------
def test_yes_no_follows_pope():
    assert yes_no("Yes, there is.") == "yes" and yes_no("No.") == "no"
    assert yes_no("There is not a dog.") == "no" and yes_no("no") == "no"
    assert yes_no("Yes. No dog though.") == "yes"  # only the first sentence counts


def test_choice_letter_and_short_normalisation():
    assert [choice_letter(t) for t in ("B", "B.", "(C) dog", "A: cat", "Dog", "")] == ["B", "B", "C", "A", None, None]
    assert normalize_short("The Two!") == "2" and normalize_short("a red  square.") == "red square"
    item = Item("x.png", "q", ("red", "dark red"), "short", "c")
    assert score(item, "Dark red.") and not score(item, "blue")


# --- JSONL tasks ------------------------------------------------------------------------------
def test_example_task_file_loads():
    items = load_jsonl(EXAMPLE_TASK)
    assert {i.kind for i in items} == {"yesno", "choice", "short"}
    assert all(Path(i.image).is_file() for i in items)


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('{"image": "shapes.png", "question": "q", "type": "yesno"}', "missing answer"),
    ('{"image": "shapes.png", "question": "q", "answer": "yes", "type": "open"}', "type 'open'"),
    ('{"image": "nope.png", "question": "q", "answer": "yes", "type": "yesno"}', "does not exist"),
])
def test_bad_jsonl_lines_name_the_line(tmp_path, line, needle):
    import shutil

    shutil.copy(EXAMPLE_TASK.parent / "shapes.png", tmp_path / "shapes.png")
    path = tmp_path / "t.jsonl"
    path.write_text('{"image": "shapes.png", "question": "q", "answer": "yes", "type": "yesno"}\n' + line + "\n")
    with pytest.raises(InputError, match=needle) as err:
        load_jsonl(path)
    assert "t.jsonl:2" in str(err.value)


def test_unknown_task_and_type_are_input_errors():
    with pytest.raises(InputError, match="unknown task"):
        load_task("mmlu")
    with pytest.raises(InputError, match="unknown ShapesVQA question type"):
        load_task("shapesvqa", limit=5, types=["colour"])


# --- statistics -------------------------------------------------------------------------------
def test_wilson_and_bootstrap_intervals():
    lo, hi = wilson(90, 100)
    assert lo < 0.9 < hi and abs(lo - 0.8256) < 1e-3 and abs(hi - 0.9448) < 1e-3
    full = np.array([1] * 80 + [0] * 20)
    assert relative_interval(full, full) == (1.0, 1.0)
    pruned = full.copy()
    pruned[:8] = 0
    lo, hi = relative_interval(pruned, full)
    assert lo < 0.9 < hi <= 1.0
    assert relative_interval(pruned, np.zeros(100, dtype=np.int64)) is None


def test_mcnemar_exact_p_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)  # all 10 discordant items one way
    assert mcnemar_p(0, 10) == mcnemar_p(10, 0)
    assert mcnemar_p(5, 5) == 1.0 and mcnemar_p(1, 0) == 1.0
    assert mcnemar_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_paired_difference_counts_discordant_items():
    rng = np.random.default_rng(0)
    b = (rng.random(200) < 0.7).astype(np.int64)
    same = paired_difference(b, b)
    assert same["diff"] == 0.0 and same["diff_ci95"] == [0.0, 0.0] and same["p_mcnemar"] == 1.0
    a = b.copy()
    wrong = np.flatnonzero(b == 0)[:30]
    a[wrong] = 1  # a gets 30 more items right ...
    a[np.flatnonzero(b == 1)[:4]] = 0  # ... and 4 fewer
    d = paired_difference(a, b)
    assert (d["wins"], d["losses"]) == (30, 4)
    assert d["diff"] == pytest.approx(26 / 200)
    assert 0 < d["diff_ci95"][0] < d["diff"] < d["diff_ci95"][1]
    assert d["p_mcnemar"] < 1e-4
    assert paired_difference(b, a)["diff"] == pytest.approx(-26 / 200)


def test_versus_pairs_the_reference_with_every_other_selector_per_budget():
    ref, other = np.array([1, 1, 0, 1]), np.array([1, 0, 0, 0])
    out = versus({("dpp-merge", 64): ref, ("cdpruner", 64): other, ("cdpruner", 32): other, ("dpp-merge", 32): other}, "dpp-merge")
    assert set(out) == {"cdpruner"} and set(out["cdpruner"]) == {"64", "32"}
    assert (out["cdpruner"]["64"]["wins"], out["cdpruner"]["64"]["losses"]) == (2, 0)
    assert out["cdpruner"]["32"]["diff"] == 0.0


def test_kl_of_the_first_answer_token():
    p = log_softmax(np.log([[0.5, 0.5], [0.2, 0.8]]) + 3.0)  # a shift of the logits changes nothing
    q = log_softmax(np.log([[0.9, 0.1], [0.2, 0.8]]))
    np.testing.assert_allclose(np.exp(p), [[0.5, 0.5], [0.2, 0.8]])
    kl = kl_divergence(p, q)
    assert kl[0] == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
    assert kl[1] == pytest.approx(0.0, abs=1e-12) and (kl_divergence(q, p) >= 0).all()
    cell = agreement_cell(np.array([0.0, 0.2, 0.4, 0.2]), np.array([1, 1, 0, 1]))
    assert cell["top1"] == 0.75 and cell["kl"] == pytest.approx(0.2) and cell["kl_median"] == pytest.approx(0.2)
    lo, hi = cell["kl_ci95"]
    assert 0.0 <= lo < 0.2 < hi <= 0.4
    assert mean_interval(np.zeros(0)) == (0.0, 0.0)


def test_versus_with_kls_reports_the_mean_difference_and_who_is_closer():
    ref, other = np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1])
    kls = {("dpp-merge", 64): np.array([0.1, 0.0, 0.3, 0.2]), ("cdpruner", 64): np.array([0.2, 0.4, 0.1, 0.6])}
    d = versus({("dpp-merge", 64): ref, ("cdpruner", 64): other}, "dpp-merge", kls)["cdpruner"]["64"]
    assert d["kl_diff"] == pytest.approx((0.6 - 1.3) / 4) and (d["kl_lower"], d["kl_higher"]) == (0.75, 0.25)
    assert d["kl_diff_ci95"][0] <= d["kl_diff"] <= d["kl_diff_ci95"][1]
    assert d["p_sign"] == pytest.approx(mcnemar_p(3, 1))
    # the sign test counts items, not sizes: one item far worse does not outvote 20 slightly better
    many = kl_comparison(np.r_[np.full(20, 0.01), 5.0], np.r_[np.full(20, 0.02), 0.0])
    assert many["kl_diff"] > 0 and many["kl_lower"] == pytest.approx(20 / 21) and many["p_sign"] < 1e-4
    equal = kl_comparison(np.array([0.1, 0.2]), np.array([0.1, 0.2]))
    assert (equal["kl_lower"], equal["kl_higher"], equal["p_sign"]) == (0.0, 0.0, 1.0)
    assert "kl_diff" not in versus({("dpp-merge", 64): ref, ("cdpruner", 64): other}, "dpp-merge")["cdpruner"]["64"]


def test_summarize_per_category_and_relative():
    cats = ["a", "a", "b", "b"]
    full = np.array([1, 1, 1, 0])
    out = summarize(cats, full, {("dpp-merge", 64): np.array([1, 0, 1, 0])})
    assert out["categories"] == ["a", "b"]
    row = out["table"]["dpp-merge"]["64"]
    assert row["all"]["accuracy"] == 0.5 and row["all"]["relative"] == pytest.approx(2 / 3)
    assert row["a"]["relative"] == 0.5 and row["b"]["relative"] == 1.0


# --- through the pipeline ---------------------------------------------------------------------
def test_use_selector_equals_an_export_with_that_selector(tiny_uniform_dir, tiny, tmp_path, images):
    from tops_edge.export import export_model
    from tops_edge.runtime import Pipeline

    baked = Pipeline.load(export_model(tiny, tmp_path / "dpp-merge", selector="dpp-merge", keep=64, progress=False))
    switched = Pipeline.load(tiny_uniform_dir).use_selector("dpp-merge")
    for name in ("wide", "tall"):
        a = baked.generate(images[name], "What is red?", max_new_tokens=3, keep=64)
        b = switched.generate(images[name], "What is red?", max_new_tokens=3, keep=64)
        assert a.kept_indices == b.kept_indices and a.token_ids == b.token_ids
    switched.use_selector("uniform")
    assert switched.generate(images["wide"], "Hi", max_new_tokens=1, keep=64).kept_indices == \
        Pipeline.load(tiny_uniform_dir).generate(images["wide"], "Hi", max_new_tokens=1, keep=64).kept_indices


def test_run_eval_reports_every_selector_budget_and_type(tiny_uniform_dir):
    report = run_eval(tiny_uniform_dir, keeps=[576, 64], selectors=["uniform", "dpp-merge"], limit=18, max_new_tokens=3)
    assert report["schema"] == "tops-eval/1" and report["settings"]["items"] == 18 and report["settings"]["skip"] == 0
    assert report["categories"] == list(shapes.QUESTION_TYPES)
    for method in ("uniform", "dpp-merge"):
        for keep in ("576", "64"):
            row = report["table"][method][keep]
            assert set(row) == {"all", *shapes.QUESTION_TYPES}
            assert row["all"]["n"] == 18
    # K = N is the unpruned run itself
    assert report["table"]["dpp-merge"]["576"]["all"]["correct"] == report["table"]["unpruned"]["all"]["correct"]
    assert {"question", "answer", "unpruned@576", "dpp-merge@64"} <= set(report["examples"][0])
    # the first selector against the others, pruned budgets only, from the same answers as the table
    assert report["versus"]["reference"] == "uniform" and set(report["versus"]["against"]) == {"dpp-merge"}
    d = report["versus"]["against"]["dpp-merge"]["64"]
    assert set(report["versus"]["against"]["dpp-merge"]) == {"64"}
    table = report["table"]
    assert d["wins"] - d["losses"] == table["uniform"]["64"]["all"]["correct"] - table["dpp-merge"]["64"]["all"]["correct"]
    assert "uniform against each selector" in format_table(report)
    # agreement with the unpruned model, per pruned budget, and the KL difference from the same numbers
    agree = report["agreement"]
    assert set(agree) == {"uniform", "dpp-merge"} and all(set(v) == {"64"} for v in agree.values())
    for cell in (agree["uniform"]["64"], agree["dpp-merge"]["64"]):
        assert cell["n"] == 18 and 0.0 <= cell["top1"] <= 1.0 and cell["kl"] >= 0.0
    assert d["kl_diff"] == pytest.approx(agree["uniform"]["64"]["kl"] - agree["dpp-merge"]["64"]["kl"])
    assert "agreement with the unpruned model" in format_table(report)


def test_jobs_split_the_items_over_workers_and_give_one_processs_report(tiny_uniform_dir):
    """--jobs 2: two spawned workers answer items 0-4 and 5-10 (unequal shares, every row and budget,
    an unreachable-free plan); the report's answers, tables, versus counts and agreement are the
    single process's (KLs to float rounding: the workers run fewer ONNX Runtime threads)."""
    kwargs = dict(keeps=[576, 64, 32], selectors=["uniform", "dpp-merge:merge=none"], limit=11, max_new_tokens=2,
                  split="val")
    one = run_eval(tiny_uniform_dir, **kwargs)
    lines: list[str] = []
    two = run_eval(tiny_uniform_dir, jobs=2, log=lines.append, **kwargs)
    # without a progress bar, a line per tenth of the answers, the last one all of them (11 x 5 runs)
    counted = [line for line in lines if " answers (" in line]
    assert counted and counted[-1].startswith("55/55 answers") and len(counted) <= 10
    assert one["settings"]["jobs"] == 1 and two["settings"]["jobs"] == 2
    assert two["examples"] == one["examples"] and two["table"] == one["table"]
    for method in ("dpp-merge:merge=none",):
        for keep in ("64", "32"):
            a, b = one["versus"]["against"][method][keep], two["versus"]["against"][method][keep]
            assert (a["wins"], a["losses"]) == (b["wins"], b["losses"])
    for method, per_keep in one["agreement"].items():
        for keep, cell in per_keep.items():
            other = two["agreement"][method][keep]
            assert other["n"] == cell["n"] == 11 and other["top1"] == cell["top1"]
            assert other["kl"] == pytest.approx(cell["kl"], rel=1e-4, abs=1e-7)
    assert two["settings"]["merge"] == one["settings"]["merge"] == {"uniform": "mean", "dpp-merge:merge=none": "none"}


def test_jobs_refuse_a_callers_pipeline(tiny_uniform_dir):
    from tops_edge.runtime import Pipeline

    with pytest.raises(InputError, match="pass pipeline= only with jobs = 1"):
        run_eval(tiny_uniform_dir, keeps=[64], limit=2, jobs=2, pipeline=Pipeline.load(tiny_uniform_dir))


def test_run_eval_kl_is_that_of_the_pipelines_own_answers(tiny_uniform_dir):
    """The report's mean KL and top-1 agreement, recomputed item by item from generate(output_logits=True)."""
    from tops_edge.runtime import Pipeline

    report = run_eval(tiny_uniform_dir, keeps=[32], selectors=["uniform"], limit=4, max_new_tokens=2)
    pipe = Pipeline.load(tiny_uniform_dir)
    kls, same = [], []
    for item in load_task("shapesvqa", limit=4):
        full = pipe.generate(item.image, item.prompt, max_new_tokens=2, keep=576, output_logits=True).logits[0]
        pruned = pipe.generate(item.image, item.prompt, max_new_tokens=2, keep=32, output_logits=True).logits[0]
        p, q = np.exp(log_softmax(full)), log_softmax(pruned)
        kls.append(float((p * (np.log(p) - q)).sum()))
        same.append(int(full.argmax() == pruned.argmax()))
    cell = report["agreement"]["uniform"]["32"]
    assert cell["kl"] == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-7) and cell["top1"] == np.mean(same)
    assert max(kls) > 0  # 32 of 576 tokens moves a random model's distribution


def test_cli_eval_on_a_jsonl_task_writes_json_and_png(tiny_uniform_dir, tmp_path, capsys):
    js, png = tmp_path / "e.json", tmp_path / "e.png"
    code = eval_main([str(tiny_uniform_dir), "--task", str(EXAMPLE_TASK), "--keep", "64,32", "--selector", "uniform,divprune",
                      "--json", str(js), "--plot", str(png), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "existence" in out and "divprune" in out
    report = json.loads(js.read_text())
    assert report["settings"]["keeps"] == [64, 32] and report["categories"] == ["existence", "recognition", "attribute"]
    assert set(report["agreement"]["divprune"]) == {"64", "32"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png.read_bytes()[16:20], "big") > 1000  # two panels: relative accuracy and KL


def test_selector_specs_with_parameters_are_rows_of_their_own(tiny_uniform_dir):
    """`tops:spatial=0` runs TOPS with that parameter (the ablation rows): its kept tokens are those of
    a pipeline switched to the same parameters, and they differ from the default's."""
    from tops_edge.runtime import Pipeline

    report = run_eval(tiny_uniform_dir, keeps=[32], selectors=["dpp-merge", "dpp-merge:spatial=0:beta=0"], limit=6,
                      max_new_tokens=1, positions="original", split="val")
    assert report["settings"]["selectors"] == ["dpp-merge", "dpp-merge:spatial=0:beta=0"]
    assert report["settings"]["positions"] == "original" and report["settings"]["split"] == "val"
    assert set(report["table"]) == {"unpruned", "dpp-merge", "dpp-merge:spatial=0:beta=0"}
    item = load_task("shapesvqa", limit=1, split="val")[0]
    pipe = Pipeline.load(tiny_uniform_dir)
    kept = {spec: pipe.use_selector("dpp-merge", **params).generate(item.image, item.prompt, max_new_tokens=1, keep=32).kept_indices
            for spec, params in (("default", {}), ("ablation", {"spatial": 0.0, "beta": 0.0}))}
    assert kept["default"] != kept["ablation"]
    # a caller's own pipeline (other session options, say) is used as given
    again = run_eval(tiny_uniform_dir, keeps=[32], selectors=["dpp-merge"], limit=6, max_new_tokens=1, split="val",
                     positions="original", pipeline=pipe.use_selector("dpp-merge"))
    assert again["table"]["dpp-merge"]["32"]["all"] == report["table"]["dpp-merge"]["32"]["all"]


def test_merge_in_a_spec_sets_that_rows_token_merging(tiny_uniform_dir):
    """`tops:merge=none` is a row of selection only; the other rows keep the run's merging, and the
    row's answers are those of a pipeline with merge none."""
    from tops_edge.runtime import Pipeline

    report = run_eval(tiny_uniform_dir, keeps=[32], selectors=["dpp-merge", "dpp-merge:merge=none"], limit=8,
                      max_new_tokens=4, split="val", merge="mean")
    assert report["settings"]["merge"] == {"dpp-merge": "mean", "dpp-merge:merge=none": "none"}
    pipe = Pipeline.load(tiny_uniform_dir).use_selector("dpp-merge")
    items = load_task("shapesvqa", limit=8, split="val")
    answers = {}
    for merge in ("mean", "none"):
        pipe.merge = merge
        answers[merge] = [pipe.generate(i.image, i.prompt, max_new_tokens=4, keep=32).text.strip() for i in items]
    shown = [e["dpp-merge@32"] for e in report["examples"]], [e["dpp-merge:merge=none@32"] for e in report["examples"]]
    assert shown == (answers["mean"], answers["none"])
    assert answers["mean"] != answers["none"]


def test_val_and_test_splits_ask_about_different_scenes():
    val, test = load_task("shapesvqa", limit=12, split="val"), load_task("shapesvqa", limit=12, split="test")
    assert all(v.image.tobytes() != t.image.tobytes() for v, t in zip(val, test))


def test_skip_starts_later_in_the_same_question_sequence():
    """--skip N evaluates items N.. of the same sequence: ShapesVQA's questions and a JSONL's lines."""
    whole = load_task("shapesvqa", limit=10, split="val", types=["count", "pope"])
    tail = load_task("shapesvqa", limit=4, split="val", types=["count", "pope"], skip=6)
    assert [(i.question, i.answer, i.category) for i in tail] == [(i.question, i.answer, i.category) for i in whole[6:]]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(tail, whole[6:]))
    lines = load_task(str(EXAMPLE_TASK))
    assert [i.question for i in load_task(str(EXAMPLE_TASK), skip=1, limit=2)] == [i.question for i in lines[1:3]]
    with pytest.raises(InputError, match="leaves none"):
        load_task(str(EXAMPLE_TASK), skip=len(lines))


@pytest.mark.parametrize("args, needle", [
    (["--skip", "-1"], "--skip must be"),
    (["--selector", "dpp-merge:alpha"], "key=value"),
    (["--selector", "dpp-merge:gamma=1"], "no parameter 'gamma'"),
    (["--selector", "dpp-merge:spatial=-1"], "spatial must be"),
    (["--selector", "dpp-merge:merge=max"], "merge is one of"),
    (["--keep", "0"], "--keep 0"),
    (["--keep", "700"], "out of range"),
    (["--selector", "none"], "does not prune"),
    (["--selector", "magic"], "unknown selector"),
    (["--task", "nope.jsonl"], "does not exist"),
    (["--limit", "0"], "--limit"),
    (["--jobs", "0"], "--jobs must be"),
])
def test_cli_eval_bad_input_is_one_line(tiny_uniform_dir, capsys, args, needle):
    code = eval_main([str(tiny_uniform_dir), "--quiet", *args])
    assert needle in one_line_error(capsys, code)


def test_eval_on_next_counts_each_images_tokens(tmp_path):
    """LLaVA-NeXT: every image has its own token count; a budget at or above it keeps everything."""
    from tops_edge.export import export_model

    out = export_model("tiny-llava-next", tmp_path / "next", selector="uniform", keep=256, progress=False)
    report = run_eval(out, task=str(EXAMPLE_TASK), keeps=[2880, 256], limit=2, max_new_tokens=2)
    assert report["settings"]["num_visual_tokens"] == 2880
    assert report["table"]["uniform"]["2880"]["all"]["correct"] == report["table"]["unpruned"]["all"]["correct"]
