"""The experiment scripts: the λ sweep's grid becomes valid params, and matched-sparsity interpolation; the
convergence experiment's params, evaluation points and plateau rule."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import ROOT

from lexvla.params import params_from_dict

spec = importlib.util.spec_from_file_location("sweep", ROOT / "experiments" / "sweep.py")
sweep = importlib.util.module_from_spec(spec); spec.loader.exec_module(sweep)
spec = importlib.util.spec_from_file_location("convergence", ROOT / "experiments" / "convergence.py")
conv = importlib.util.module_from_spec(spec); spec.loader.exec_module(conv)


def test_grid_is_valid_params_on_the_val_split():
    d = sweep.sweep_params(ROOT / "params.yaml", steps=7)
    p = params_from_dict(d, source="sweep")
    assert p.evaluate.split == "val" and p.train.steps == 7
    assert {v.reg for v in p.train.variants.values()} == {"overuse", "flops", "none"}
    assert p.train.variants["flops-0.0001"].lam == pytest.approx(1e-4)


def test_matched_sparsity_interpolates_in_log_active_words():
    rows = [{"reg": "none", "image_active_words": 4000.0, "mean_R@1": 0.10},
            {"reg": "overuse", "image_active_words": 1000.0, "mean_R@1": 0.20},
            {"reg": "flops", "image_active_words": 500.0, "mean_R@1": 0.05}]
    m = sweep.at_matched(rows, "mean_R@1", [2000.0, 800.0])
    assert m["overuse"][0] == pytest.approx(0.15)  # half-way between 1000 and 4000 in log
    assert m["overuse"][1] is None                  # below overuse's sparsest run: not extrapolated
    assert m["flops"][0] == pytest.approx(0.05 + 0.05 * math.log(4) / math.log(8))


def test_the_grid_keys_drive_the_matched_comparison(monkeypatch):
    "A regulariser added to GRID gets its own matched-sparsity column (nothing names overuse/FLOPs but GRID)."
    monkeypatch.setattr(sweep, "GRID", {**sweep.GRID, "l1": (1e-3,)})
    rows = [{"reg": "none", "image_active_words": 4000.0, "mean_R@1": 0.10},
            {"reg": "overuse", "image_active_words": 1000.0, "mean_R@1": 0.20},
            {"reg": "l1", "image_active_words": 1000.0, "mean_R@1": 0.30}]
    assert sweep.penalised() == ["overuse", "flops", "l1"]
    m = sweep.at_matched(rows, "mean_R@1", [2000.0])
    assert set(m) == {"overuse", "flops", "l1"} and m["l1"][0] == pytest.approx(0.20)
    assert m["flops"] == [None]  # only the shared λ = 0 point: nothing to interpolate between


def test_convergence_params_are_valid_and_evaluate_val():
    d = conv.experiment_params(ROOT / "params.yaml", list(conv.VARIANTS), steps=900, eval_every=300, split="val")
    p = params_from_dict(d, source="convergence")
    assert p.evaluate.split == "val" and p.train.steps == 900 and p.train.checkpoint_every == 300
    assert {(v.model, v.reg) for v in p.train.variants.values()} == {
        ("lexvla", "overuse"), ("dense", "none"), ("lexvla", "flops"), ("bow", "overuse"), ("lexvla", "none")}
    assert conv.points(900, 300) == [300, 600, 900] and conv.points(1000, 300) == [300, 600, 900, 1000]


def test_a_lever_changes_one_key_over_the_preset_and_a_bad_one_is_refused():
    "`--set model.vocab.filter=words` merges over the embedded preset (min_len kept); a prompt lever keeps its slot."
    d = conv.experiment_params(ROOT / "params.yaml", ["lexvla"], steps=300, eval_every=300, split="val",
                               sets=["model.vocab.filter=words", 'model.prompt="{caption}" in one word:'])
    p = params_from_dict(d, source="lever")
    assert p.model.vocab.filter == "words" and p.model.vocab.min_len == 2
    assert p.model.prompt == '"{caption}" in one word:'
    lam = params_from_dict(conv.experiment_params(ROOT / "params.yaml", ["lexvla"], 300, 300, "val",
                                                  sets=["train.lambda_img=1e-2"]), source="lever")
    assert lam.train.lambda_img == 1e-2  # YAML 1.1 reads 1e-2 as text; the lever reads it as the number
    share = conv.experiment_params(ROOT / "params.yaml", ["lexvla", "bow"], 300, 300, "val",
                                   sets=["train.variants.lexvla.settings.share=sum"])
    assert params_from_dict(share, source="lever").train.variants["lexvla"].settings == {"share": "sum"}
    assert share["train"]["variants"]["bow"]["settings"] == {"share": "mean"}  # one variant's lever, not the table's
    assert conv.VARIANTS["lexvla"]["settings"] == {"share": "mean"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        conv.experiment_params(ROOT / "params.yaml", ["lexvla"], 300, 300, "val", sets=["model.vocab.filter"])
    with pytest.raises(Exception, match="filter"):  # the strict loader names the key and the registered filters
        params_from_dict(conv.experiment_params(ROOT / "params.yaml", ["lexvla"], 300, 300, "val",
                                                sets=["model.vocab.filter=nouns"]), source="lever")


def _curve(values):
    return [{"step": 100 * (i + 1), "mean_R@1": m, "i2t_R@1": m, "t2i_R@1": m} for i, m in enumerate(values)]


def test_plateau_rule_reads_the_last_third():
    flat = conv.plateau(_curve([0.1, 0.2, 0.30, 0.302, 0.303, 0.304]), gain=0.005)
    # the last third of 600 steps starts at step 400: 0.304 - 0.302 gained
    assert flat["reached"] and flat["from_step"] == 400 and flat["gain_last_third"] == pytest.approx(0.002)
    rising = conv.plateau(_curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), gain=0.005)
    assert not rising["reached"] and rising["gain_last_third"] == pytest.approx(0.2)
    assert not conv.plateau(_curve([0.1, 0.1]), gain=0.005)["reached"]


spec = importlib.util.spec_from_file_location("sparse_robustness", ROOT / "experiments" / "sparse_robustness.py")
robust = importlib.util.module_from_spec(spec); spec.loader.exec_module(robust)


def test_sparse_robustness_agrees_with_the_evaluate_stage_protocol():
    """The `both` rule is the evaluate stage's top-k sparsification (metrics.sparsity_sweep); `both+renorm` is the
    same cut renormalised; k = V keeps everything; the self-score share is the kept squared norm."""
    import torch
    from lexvla.metrics import sparsity_sweep
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.rand(40, 200, generator=g) ** 6, dim=1)
    t2i = torch.arange(40).repeat_interleave(3)
    txt = torch.nn.functional.normalize(img[t2i] + 0.3 * torch.rand(120, 200, generator=g) ** 6, dim=1)
    a = robust.analyse(img, txt, t2i, [8, 200])
    ref = {r["topk"]: r for r in sparsity_sweep(img, txt, t2i, 200, [8], threshold=False, ks=(1,))}
    cut, full = a["rows"]
    assert cut["both"]["R@1"] == pytest.approx((ref[8]["image_to_text_R@1"], ref[8]["text_to_image_R@1"]))
    r = robust.r_at_1(robust.cut(img, 8, True), robust.cut(txt, 8, True), t2i)
    assert cut["both+renorm"]["R@1"] == pytest.approx(r) and cut["both"]["R@1"] != pytest.approx(r)
    kept = img * robust.topk_mask(img, 8)
    assert cut["image_self_share"] == pytest.approx(float((kept ** 2).sum(1).mean()))
    assert full["both"]["share_of_full"] == [1.0, 1.0] and full["matched_score_share"] == pytest.approx(1.0)
    assert 1 <= a["matched_score_words"]["50%"] <= a["matched_score_words"]["90%"] <= 200


def test_merge_keeps_other_variants_with_their_provenance(tmp_path):
    "Variants run in different sessions accumulate in one record; another horizon is refused, not mixed in."
    old = {"steps": 600, "eval_every": 150, "split": "val", "machine": "old box", "commit": "abc1234",
           "curves": {"lexvla": _curve([0.1, 0.2]), "dense": _curve([0.0])}}
    (tmp_path / "results.json").write_text(json.dumps(old))
    rec = {"steps": 600, "eval_every": 150, "split": "val", "curves": {"dense": _curve([0.3])},
           "provenance": {"dense": {"machine": "new box", "commit": "def5678", "precision": "fp32", "note": ""}}}
    mine = rec["curves"]
    conv.merge_previous(rec, tmp_path / "results.json")
    assert set(mine) == {"dense"}  # the run's own curves (the ones evaluated on test) are left alone
    assert rec["curves"]["dense"] == _curve([0.3])  # this run's curve wins
    assert rec["curves"]["lexvla"] == old["curves"]["lexvla"]
    assert rec["provenance"]["lexvla"] == {"machine": "old box", "commit": "abc1234", "precision": "?", "note": "?"}
    with pytest.raises(SystemExit, match="another experiment"):
        conv.merge_previous({**rec, "steps": 1200}, tmp_path / "results.json")


def test_convergence_record_has_a_section_per_evaluated_set(tmp_path, monkeypatch):
    "Each evaluated set (the default's seen and unseen) gets its curves, plateaus and claims; merges stay per set."
    monkeypatch.setattr(conv, "HERE", tmp_path)
    d = conv.experiment_params(ROOT / "params.yaml", ["lexvla"], steps=300, eval_every=100, split="val")
    assert conv.eval_sets(d) == list(d["evaluate"]["sets"]) and len(conv.eval_sets(d)) >= 2
    sub = lambda m: {"curves": {"lexvla": _curve(m)}, "plateaus": {"lexvla": conv.plateau(_curve(m), 0.005)},
                     "provenance": {"lexvla": {"machine": "box", "commit": "abc", "precision": "fp32", "note": ""}}}
    rec = {"steps": 300, "eval_every": 100, "split": "val", "rule": "r", "plateau_gain": 0.005,
           "sets": {"seen": sub([0.1, 0.2, 0.3]), "unseen": sub([0.05, 0.06, 0.061])}}
    conv.report(rec)
    md = (tmp_path / "results.md").read_text()
    assert "## Set `seen`" in md and "## Set `unseen`" in md and (tmp_path / "curves.png").is_file()
    seen_part, unseen_part = md.split("## Set `unseen`")
    assert "| lexvla | no |" in seen_part and "| lexvla | yes |" in unseen_part  # each set's own plateau
    new = {"steps": 300, "eval_every": 100, "split": "val", "curves": {"dense": _curve([0.4])},
           "provenance": {"dense": {}}}
    conv.merge_previous(new, tmp_path / "results.json", "unseen")
    assert new["curves"]["lexvla"] == _curve([0.05, 0.06, 0.061])  # the unseen set's, not the seen set's


spec = importlib.util.spec_from_file_location("compare", ROOT / "experiments" / "compare.py")
compare = importlib.util.module_from_spec(spec); spec.loader.exec_module(compare)


def _results(folder, variants: dict, levers=(), steps=300):
    "A convergence results folder: `variants` maps name -> (mean R@1 of its last point, active words or None)."
    curve = lambda m, aw: [{"step": steps, "i2t_R@1": m, "t2i_R@1": m, "mean_R@1": m, "top20_words": ["dog", "cat"],
                            **({"image_active_words": aw, "text_active_words": aw / 2} if aw else {})}]
    folder.mkdir(parents=True)
    sets = {es: {"curves": {v: curve(m, aw) for v, (m, aw) in variants.items()},
                 "provenance": {v: {"levers": list(levers), "precision": "fp32"} for v in variants}}
            for es in ("seen", "unseen")}
    (folder / "results.json").write_text(json.dumps({"steps": steps, "eval_every": steps, "sets": sets}))


def test_compare_reads_each_folders_last_points_with_their_lambda_and_levers(tmp_path):
    "The λ of a row comes from its lever (or 0 for nopenalty, the default otherwise); rows sort by set, then recall."
    _results(tmp_path / "h300", {"lexvla": (0.10, 1200.0), "nopenalty": (0.12, 900.0), "dense": (0.09, None)})
    _results(tmp_path / "lam", {"lexvla": (0.11, 700.0)}, levers=["train.lambda_img=1e-2", "train.lambda_txt=1e-2"])
    _results(tmp_path / "words", {"lexvla": (0.05, 800.0)}, levers=["model.vocab.filter=words"])
    (tmp_path / "cache-short").mkdir()  # a glob over experiments/levers/*/ also names the lever caches: skipped
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"captions": ["a Dog.", "two dogs"]}))
    rs = compare.rows([tmp_path / "h300", tmp_path / "lam", tmp_path / "words", tmp_path / "cache-short"], lam0=1e-3,
                      vocab=lambda es: [caps, tmp_path / "absent.json"])
    assert {tuple(r["off_caption"]) for r in rs} == {("cat",)}  # "dog" is a caption word, "cat" is not
    seen = [r for r in rs if r["set"] == "seen"]
    assert [r["mean_R@1"] for r in seen] == [0.12, 0.11, 0.10, 0.09, 0.05] and len(rs) == 10
    lam = {(Path(r["folder"]).name, r["variant"]): r["lam"] for r in seen}
    assert lam == {("h300", "lexvla"): 1e-3, ("h300", "nopenalty"): 0.0, ("h300", "dense"): None,
                   ("lam", "lexvla"): 1e-2, ("words", "lexvla"): 1e-3}
    md = compare.markdown(rs)
    assert md.count("## Set") == 2 and "`model.vocab.filter=words`" in md and "train.lambda_img" not in md
    assert "| dense | - | none | 300 | 0.090 / 0.090 | 0.090 | - |" in md and md.rstrip().endswith("| 1: cat |")
    compare.plot(rs, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no results.json in"):
        compare.rows([tmp_path / "missing", tmp_path / "cache-short"], lam0=1e-3)



def test_the_report_stage_renders_the_compare_record_and_a_convergence_record(tmp_path, monkeypatch):
    "compare.py --json writes what lexvla.report puts in summary.md; a convergence results.json renders beside it."
    from lexvla.report import experiments_markdown
    _results(tmp_path / "h300", {"lexvla": (0.10, 1200.0), "nopenalty": (0.12, 900.0)})
    _results(tmp_path / "words", {"lexvla": (0.05, 800.0)}, levers=["model.vocab.filter=words"])
    monkeypatch.setattr(compare, "default_lambda", lambda: 1e-3)
    assert compare.main([str(tmp_path / "h300"), str(tmp_path / "words"), "--json", str(tmp_path / "c.json")]) == 0
    rec = json.loads((tmp_path / "h300" / "results.json").read_text())
    rec["rule"] = "the rule"
    (tmp_path / "h300" / "results.json").write_text(json.dumps(rec))
    md = "\n".join(experiments_markdown([tmp_path / "c.json", tmp_path / "h300" / "results.json"]))
    assert "| words | lexvla | 0.001 | `model.vocab.filter=words` | 300 | 0.050 / 0.050 | 0.050 | 800 | - |" in md
    assert "| nopenalty | 0 | none | 300 |" in md  # the λ = 0 run, from the levers record
    assert "| nopenalty | 300 | 0.120 / 0.120 | 900 | - | - |" in md  # the convergence record: no plateau entry
    assert md.count("no test claims in this record") == 2  # one per set: the record has no claims


def test_convergence_report_says_when_the_rule_was_not_tested_and_prints_ratios_unsigned(tmp_path, monkeypatch):
    "A one-point run is 'not tested', not 'no'; a difference claim is signed, a ratio claim (against 0.95) is not."
    monkeypatch.setattr(conv, "HERE", tmp_path)
    claims = [{"claim": "LexVLA - dense, i->t R@1", "estimate": 0.04, "low": 0.01, "high": 0.07, "threshold": 0.0,
               "verdict": "holds"},
              {"claim": "LexVLA top-256 / full, i->t R@1", "estimate": 0.85, "low": 0.70, "high": 1.04,
               "threshold": 0.95, "verdict": "undecided"}]
    one = _curve([0.1])
    rec = {"steps": 100, "eval_every": 100, "split": "val", "rule": "r", "plateau_gain": 0.005,
           "sets": {"seen": {"curves": {"lexvla": one}, "plateaus": {"lexvla": conv.plateau(one, 0.005)},
                             "provenance": {"lexvla": {}}, "claims": claims, "test_n_images": 500}}}
    conv.report(rec)
    md = (tmp_path / "results.md").read_text()
    assert "| lexvla | not tested (fewer than 3 evaluation points) |" in md
    assert "| +0.040 | [+0.010, +0.070] | **holds** |" in md and "| 0.850 | [0.700, 1.040] | **undecided** |" in md


spec = importlib.util.spec_from_file_location("plateau_claims", ROOT / "experiments" / "plateau_claims.py")
pclaims = importlib.util.module_from_spec(spec); spec.loader.exec_module(pclaims)


def _run_folder(folder, variant, model, reg, ranks, steps, means):
    "A convergence folder holding one variant's val curve (means) and its test evaluation (ranks on 40 images)."
    import numpy as np
    from lexvla.metrics import save_per_query
    n = 40
    t2i = np.repeat(np.arange(n), 2)
    curve = [{"step": steps * (i + 1) // len(means), "i2t_R@1": m, "t2i_R@1": m, "mean_R@1": m}
             for i, m in enumerate(means)]
    sets = {}
    for es in ("seen", "unseen"):
        sets[es] = {"curves": {variant: curve}, "plateaus": {variant: conv.plateau(curve, 0.005)}}
        test = folder / "runs" / "test" / es
        r = {"image_to_text": ranks(n), "text_to_image": ranks(2 * n)}
        save_per_query(test / variant / "per_query.npz", {"dense": r, "top256": r}, t2i)
        (test / f"{variant}.json").write_text(json.dumps({"model": model, "reg": reg, "n_images": n}))
    (folder / "results.json").write_text(json.dumps({"steps": steps, "eval_every": steps // 3, "rule": "r",
                                                     "sets": sets}))


def test_plateau_claims_pair_runs_of_different_horizons(tmp_path):
    "Each variant's test ranks come from its own folder; the record names each run's horizon and plateau."
    import numpy as np
    good, half = (lambda k: np.ones(k)), (lambda k: 1.0 + np.arange(k) % 2)
    _run_folder(tmp_path / "h600", "lexvla", "lexvla", "overuse", good, 600, [0.1, 0.2, 0.201])
    _run_folder(tmp_path / "h900", "dense", "dense", "none", half, 900, [0.1, 0.2, 0.3])
    out = tmp_path / "claims"
    assert pclaims.main([f"lexvla={tmp_path / 'h600'}", f"dense={tmp_path / 'h900'}", "--out", str(out)]) == 0
    rec = json.loads((out / "claims.json").read_text())
    assert rec["runs"]["lexvla"]["steps"] == 600 and rec["runs"]["dense"]["steps"] == 900
    plateau = {v: r["plateau"]["seen"]["reached"] for v, r in rec["runs"].items()}
    assert plateau == {"lexvla": True, "dense": False}
    c = {x["claim"]: x for x in rec["sets"]["unseen"]["claims"]}
    assert c["LexVLA - dense, i->t R@1"]["verdict"] == "holds" and c["LexVLA - dense, i->t R@1"]["estimate"] == 0.5
    md = (out / "claims.md").read_text()
    assert md.startswith("### `") and "| dense | `" in md and "| 900 | **not reached** / **not reached** |" in md
    with pytest.raises(SystemExit, match="no curve of 'flops' on set 'seen'"):
        pclaims.main([f"flops={tmp_path / 'h600'}", "--out", str(out)])
    (tmp_path / "h900" / "runs" / "test" / "seen" / "dense.json").unlink()
    with pytest.raises(SystemExit, match="no test evaluation of 'dense'"):
        pclaims.main([f"dense={tmp_path / 'h900'}", "--out", str(out)])
    with pytest.raises(SystemExit, match="expected VARIANT=FOLDER"):
        pclaims.main(["lexvla", "--out", str(out)])


spec = importlib.util.spec_from_file_location("numerics_check", ROOT / "experiments" / "numerics_check.py")
ncheck = importlib.util.module_from_spec(spec); spec.loader.exec_module(ncheck)


def _evaluation(root, es, variant, i2t, t2i, inter=None, union=None):
    "An evaluate-stage folder entry: <set>/<variant>.json and its per_query.npz."
    import numpy as np
    from lexvla.metrics import save_per_query
    pd = None if inter is None else {"intersection": inter, "union": union}
    save_per_query(root / es / variant / "per_query.npz", {"dense": {"image_to_text": i2t, "text_to_image": t2i}},
                   np.repeat(np.arange(len(i2t)), 2), pd)
    (root / es / f"{variant}.json").write_text("{}")


def test_numerics_check_pairs_two_evaluations_over_images(tmp_path):
    "After - before per metric, paired over the same images; a split that differs is refused by name."
    import numpy as np
    n = 40
    hit, miss = np.ones(n), np.full(n, 5.0)
    inter, union = np.ones((n, 3), np.int64), np.full((n, 3), 2, np.int64)
    _evaluation(tmp_path / "a", "seen", "lexvla", hit, np.ones(2 * n), inter, union)
    _evaluation(tmp_path / "b", "seen", "lexvla", np.where(np.arange(n) < n // 2, 1.0, 5.0), np.ones(2 * n),
                inter, union)
    _evaluation(tmp_path / "a", "seen", "dense", miss, np.ones(2 * n))  # only in a: not compared
    out = tmp_path / "check.md"
    assert ncheck.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--json",
                        str(tmp_path / "check.json")]) == 0
    rows = {r["metric"]: r for r in json.loads((tmp_path / "check.json").read_text())}
    assert set(rows) == {"i->t R@1", "t->i R@1", "PatchDis mIoU"}
    assert rows["i->t R@1"]["before"] == 1.0 and rows["i->t R@1"]["after"] == 0.5
    assert rows["i->t R@1"]["change"]["estimate"] == -0.5 and rows["i->t R@1"]["change"]["high"] < 0
    assert rows["t->i R@1"]["change"]["estimate"] == 0 and rows["PatchDis mIoU"]["change"]["high"] == 0
    assert "| seen | lexvla | i->t R@1 | 1.000 | 0.500 | -0.500 |" in out.read_text()
    _evaluation(tmp_path / "b", "seen", "lexvla", hit[:-1], np.ones(2 * n - 2))
    with pytest.raises(SystemExit, match="other captions or images"):
        ncheck.main([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="no evaluation"):
        ncheck.main([str(tmp_path / "a"), str(tmp_path / "nothing")])
