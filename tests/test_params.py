"""The strict params loader, through its command line, as a user meets it."""
import copy
import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run

GOOD = yaml.safe_load((ROOT / "params.yaml").read_text())


def check(tmp_path, d):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(d))
    return run([sys.executable, "-m", "lexvla.params", "check", str(f)], check=False)


def mutated(fn):
    d = copy.deepcopy(GOOD)
    fn(d)
    return d


def test_good_file_passes(tmp_path):
    r = check(tmp_path, GOOD)
    assert r.returncode == 0 and "ok" in r.stdout


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["base"].update(sed=d["base"].pop("seed")), "base.sed: unknown key (did you mean base.seed?)"),
    (lambda d: d["prepare"].update(n_train="many"), 'prepare.n_train: got "many", expected int'),
    (lambda d: d["base"].update(seed=1.5), "base.seed: got 1.5, expected int"),
    (lambda d: d["base"].update(deterministic="yes"), 'base.deterministic: got "yes", expected bool'),
    (lambda d: d["base"].update(device="tpu"), "base.device: got \"tpu\", expected 'auto' | 'cpu' | 'cuda'"),
    (lambda d: d.pop("prepare"), "prepare: missing section"),
    (lambda d: d["base"].pop("seed"), "base.seed: missing key (expected int)"),
    (lambda d: d.update(trian={}), "trian: unknown section"),
    (lambda d: d["train"]["variants"].update(lm={"model": "lexvla", "reg": "overuse", "lam": None}),
     "train.variants.lm: models/lm holds the base model"),
    (lambda d: d["evaluate"].update(sets={}), "evaluate.sets: got {}, expected at least one evaluated set"),
    (lambda d: d["evaluate"]["sets"].update({"a/b": {"source": "x.json"}}), "evaluate.sets.a/b: expected a name of"),
    (lambda d: d["evaluate"]["sets"].update(coco={"source": "c.json", "format": "cocoa"}),
     "evaluate.sets.coco.format: got \"cocoa\", expected 'karpathy' | 'coco'"),
    (lambda d: d["evaluate"]["sets"].update(zz={"source": None, "concepts": "seen"}),
     "evaluate.sets.zz: source null with concepts 'seen' is set 'seen' again (prepare's split): they are one set"),
    (lambda d: d["evaluate"]["sets"].update(coco={"source": "c.json", "concepts": "unseen"}),
     "evaluate.sets.coco.concepts: got 'unseen', but a set with a source of its own has no concept pool"),
    (lambda d: d["evaluate"]["sets"]["seen"].update(concepts="rare"),
     "evaluate.sets.seen.concepts: got \"rare\", expected 'all' | 'seen' | 'unseen'"),
    (lambda d: d["prepare"].update(kind="manifest", source="pairs.csv"),
     "evaluate.sets: seen, unseen: kind 'manifest' defines one evaluated split"),
    (lambda d: d["prepare"].update(world="lego"), "prepare.world: got \"lego\", expected 'shapes' | 'pictograms'"),
    (lambda d: d["prepare"].update(unseen_share=1.0), "prepare.unseen_share: got 1.0, expected a share in (0, 1)"),
    (lambda d: d["search"].update(set="coco"), "search.set: got 'coco', expected a key of evaluate.sets (seen, unseen)"),
    (lambda d: d["report"].update(set="coco"), "report.set: got 'coco', expected a key of evaluate.sets (seen, unseen)"),
])
def test_bad_file_fails_with_one_named_line(tmp_path, mutate, expected):
    r = check(tmp_path, mutated(mutate))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expected in lines[0] and str(tmp_path / "params.yaml") in lines[0]


def test_not_yaml_and_missing_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("base: [unclosed\n")
    r = run([sys.executable, "-m", "lexvla.params", "check", str(f)], check=False)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    r = run([sys.executable, "-m", "lexvla.params", "check", str(tmp_path / "nope.yaml")], check=False)
    assert r.returncode == 2 and "nope.yaml: params file not found" in r.stderr


def test_checking_params_does_not_import_torch():
    "Why a bad params file fails in well under a second: the loader imports no heavy library."
    code = "import sys, lexvla.params as p; p.load_params(); print(sorted(m for m in ('torch','transformers','timm') if m in sys.modules))"
    r = run([sys.executable, "-c", code])
    assert r.stdout.strip() == "[]"


def test_paper_profile_is_valid_and_becomes_set_params():
    from lexvla.params import apply_profile, overrides
    merged = apply_profile("paper")
    assert merged["model"]["preset"] == "paper"
    args = overrides("paper")
    assert 'model.preset="paper"' in args
    assert sorted(merged["train"]["variants"]) == ["dense", "lexvla"]
    for a in args:  # every override names an existing key, adds (`+`) one params.yaml leaves to its default,
        if a.startswith("+"): continue  # or deletes (`~`) one
        sec, *rest = a.split("=", 1)[0].removeprefix("~").split(".")
        node = GOOD[sec]
        for k in rest:
            node = node[k]


def test_profile_with_unknown_key_is_refused(tmp_path):
    from lexvla.params import ParamsError, apply_profile
    p = tmp_path / "bad.yaml"
    p.write_text("base:\n  sed: 3\n")
    with pytest.raises(ParamsError, match="base.sed: unknown key"):
        apply_profile(p)


def test_profiles_merge_one_way(tmp_path):
    """Issue 34: one rule. A profile merges key by key at every depth, except the schema's maps of named entries
    (train.variants, evaluate.sets), which it gives whole."""
    from lexvla.params import REPLACED_BY_PROFILES, apply_profile, named_maps
    assert REPLACED_BY_PROFILES == named_maps() == ("train.variants", "evaluate.sets")
    prof = tmp_path / "p.yaml"
    prof.write_text("model:\n  lora: {rank: 16}\ntrain:\n  steps: 7\n  variants:\n"
                    "    dense: {model: dense, reg: none, lam: null}\n")
    merged = apply_profile(prof)
    assert merged["model"]["lora"] == {"rank": 16}  # merged over the preset's lora when the model is resolved
    assert merged["train"]["steps"] == 7 and merged["train"]["lr"] == GOOD["train"]["lr"]  # key by key
    assert list(merged["train"]["variants"]) == ["dense"]  # given whole: lexvla is not trained
    assert merged["evaluate"]["sets"] == GOOD["evaluate"]["sets"]  # not given: params.yaml's


def test_an_evaluated_set_named_elsewhere_must_exist(tmp_path):
    """A profile (or params file) whose evaluate.sets lacks the set report.set or search.set names is refused when it
    is loaded, with the fix, also when a stage loads its section alone (search: `only=["search"]`)."""
    from lexvla.params import ParamsError, apply_profile, load_params
    prof = tmp_path / "coco.yaml"
    prof.write_text("evaluate:\n  sets:\n    coco: {source: coco.json}\nreport:\n  set: coco\n")
    with pytest.raises(ParamsError, match=r"search\.set: got 'seen', expected a key of evaluate\.sets \(coco\); "
                                          r"fix: search\.set: coco, or list seen in evaluate\.sets"):
        apply_profile(prof)
    prof.write_text(prof.read_text() + "search:\n  set: coco\n")
    assert list(apply_profile(prof)["evaluate"]["sets"]) == ["coco"]
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(mutated(lambda d: d["report"].update(set="embedded"))))
    for only in (None, ["report"]):
        with pytest.raises(ParamsError, match="report.set: got 'embedded'.*fix: report.set: seen"):
            load_params(f, only=only)
    assert load_params(f, only=["search"]).search.set == "seen"


def test_save_resolved_records_params(tmp_path):
    from lexvla.params import load_params
    from lexvla.runtime import save_resolved
    dest = save_resolved(load_params(), tmp_path / "out", extra={"device": "cpu"})
    rec = json.loads(dest.read_text())
    assert rec["params"]["base"] == GOOD["base"] and rec["device"] == "cpu"


def test_every_key_is_described_once_in_the_schema():
    """Each field of every section (and of the model's parts) has its description in the schema, which
    `show --comments` prints beside its value: the one place a key is described."""
    import dataclasses
    import typing
    from lexvla import params as P
    todo, missing = list(P.SECTIONS.values()), []
    while todo:
        cls = todo.pop()
        docs, hints = P.key_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]): todo.append(hints[f.name])
            elif not docs.get(f.name): missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, missing
    shown = run([sys.executable, "-m", "lexvla.params", "show", "--comments"]).stdout
    assert "  lambda_img: 0.001  # final weight of the image regulariser" in shown
    assert "  batch_size: 64  # inputs per forward pass" in shown  # inherited from the caches' common schema
