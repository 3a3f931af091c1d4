"""essl.eval.phc_compare end to end in quick mode: files, JSON schema, Markdown table, reuse of finished stages,
determinism given seeds, and one-line user errors."""

import dataclasses
import json

import pytest

from essl.errors import UserError
from essl.eval import phc_compare as pc

METHOD_ROWS = ("scratch", "simclr", "simclr-invariant", "e-simclr")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("phc_compare")
    assert pc.main(["--out", str(out), "--quick"]) == 0
    return out


def test_quick_run_writes_results(quick_run, capsys):
    out = quick_run
    for name in ("results.md", "results.json", "error_vs_labels.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == pc.RESULTS_FORMAT and res["quick"] is True
    s = res["settings"]
    assert s == pc.QUICK.to_dict()
    assert set(res["errors"]) == set(pc.KINDS)
    for kind, by_method in res["errors"].items():
        assert tuple(by_method) == METHOD_ROWS
        for by_n in by_method.values():
            assert list(by_n) == [str(n) for n in s["n_labels"]]
            for summary in by_n.values():
                assert set(summary) == {"mean", "std", "per_seed"}
                assert len(summary["per_seed"]) == s["seeds"]
                assert all(0 < e < 10 for e in summary["per_seed"])  # fractions, finite, not absurd
        for method in pc.METHODS:
            assert (out / "pretrain" / f"{kind}_{method}" / "encoder.pt").exists()
        for role in ("unlabelled", "train", "test"):
            assert (out / "data" / f"{kind}-{role}.h5").exists()
    stages = res["stage_seconds"]
    assert {f"data {k}" for k in pc.KINDS} <= set(stages)
    assert {f"pretrain {k} {m}" for k in pc.KINDS for m in pc.METHODS} <= set(stages)
    assert res["total_seconds"] > 0 and res["within_budget"] is True

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "dataset" not in line]
    assert len(rows) == len(pc.KINDS) * len(METHOD_ROWS)
    assert all(line.count(" ± ") == len(s["n_labels"]) for line in rows)
    assert "E-SimCLR" in table and "Settings:" in table


def test_rerun_reuses_everything_and_is_deterministic(quick_run, tmp_path):
    out = quick_run
    first = json.loads((out / "results.json").read_text())
    encoder = out / "pretrain" / "levelset_e-simclr" / "encoder.pt"
    mtime = encoder.stat().st_mtime_ns
    again = pc.run_compare(out, pc.QUICK, log=lambda _: None)
    assert encoder.stat().st_mtime_ns == mtime  # reused, not retrained
    assert again["errors"] == first["errors"]
    # from nothing, in another folder: the same numbers (seeded data, pretraining and regression)
    fresh = pc.run_compare(tmp_path / "fresh", dataclasses.replace(pc.QUICK, kinds=("levelset",)),
                           log=lambda _: None)
    assert fresh["errors"]["levelset"] == first["errors"]["levelset"]


def test_changed_settings_do_not_reuse_a_run(quick_run):
    changed = dataclasses.replace(pc.QUICK, pretrain_epochs=2, kinds=("blob",))
    with pytest.raises(UserError, match="other settings"):
        pc.run_compare(quick_run, changed, log=lambda _: None)


def test_user_errors(tmp_path, capsys):
    assert pc.main(["--out", str(tmp_path), "--quick", "--n-labels", "1000"]) == 2
    assert "exceeds the train file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        pc.main(["--n-labels", "a,b"])
    assert exc.value.code == 2
