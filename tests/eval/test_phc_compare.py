"""essl.eval.phc_compare end to end in quick mode: files, JSON schema, Markdown tables, reuse of finished stages,
determinism given seeds, the worker pool, and one-line user errors."""

import dataclasses
import json

import pytest

from essl.errors import UserError
from essl.eval import phc_compare as pc

ROWS = ("scratch", "simclr", "simclr-invariant", "e-simclr")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("phc_compare")
    assert pc.main(["--out", str(out), "--quick"]) == 0
    return out


def test_quick_run_writes_results(quick_run):
    out = quick_run
    for name in ("results.md", "results.json", "error_vs_labels.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == pc.RESULTS_FORMAT
    s = res["settings"]
    assert s == pc.QUICK.to_dict()
    assert set(res["errors"]) == {"finetune", "frozen", "old_eq_input"}
    assert set(res["errors"]["finetune"]) == set(pc.KINDS)
    for kind, by_arm in res["errors"]["finetune"].items():
        assert tuple(by_arm) == ROWS
        for by_n in by_arm.values():
            assert list(by_n) == [str(n) for n in s["n_labels"]]
            for summary in by_n.values():
                assert set(summary) == {"mean", "std", "per_seed"}
                assert len(summary["per_seed"]) == s["seeds"]
                assert all(0 < e < 10 for e in summary["per_seed"])  # fractions, finite, not absurd
        assert tuple(res["errors"]["frozen"][kind]) == pc.ARMS
        assert list(res["errors"]["old_eq_input"][kind]) == [pc.OLD_INPUT]
        for arm in (*pc.ARMS, pc.OLD_INPUT):
            assert (out / "pretrain" / f"{kind}_{arm}" / "encoder.pt").exists()
        for role in ("unlabelled", "train", "test"):
            assert (out / "data" / f"{kind}-{role}.h5").exists()
    # every pretraining run with an equivariance branch records its accuracy; the plain runs predict nothing
    for kind, by_arm in res["pretraining"].items():
        assert by_arm["simclr"]["equi_acc"] is None and by_arm["simclr"]["predicted"] is None
        e = by_arm["e-simclr"]
        assert 0 <= e["equi_acc"] <= 1 and e["eq_input_ops"] == []
        assert e["predicted"] == ("translate" if kind == "blob" else "rot4")
        assert by_arm[pc.OLD_INPUT]["eq_input_ops"] == list(pc.OLD_EQ_OPS[kind])
    # the fine-tuning augmentation of each arm is its own views; scratch gets the base views
    runs = res["regression_runs"]["finetune"]["levelset"]
    augment = {arm: runs[arm][str(s["n_labels"][0])]["settings"].get("augment") for arm in ROWS}
    assert augment.get("simclr-invariant") != augment.get("simclr") or augment.get("simclr") is None
    assert set(res["stage_seconds"]) == {"data", "pretraining", "regression"}
    assert res["total_seconds"] > 0

    table = (out / "results.md").read_text()
    main_rows = table.split("Ablation")[0]
    rows = [line for line in main_rows.splitlines() if line.startswith("| ") and "dataset" not in line]
    assert len(rows) == len(pc.KINDS) * len(ROWS)
    assert all(line.count(" ± ") == len(s["n_labels"]) for line in rows)
    assert "E-SimCLR" in table and "Settings" in table and "Bayes limit" in table


def test_arm_augmentations_follow_the_reference():
    """rdangovs/essl photonics/load_config.py: each arm fine-tunes with its own view flags."""
    assert pc.arm_augment("levelset", "simclr") == pc.arm_augment("levelset", pc.SCRATCH) == "shift+flip3"
    assert pc.arm_augment("levelset", "e-simclr") == "shift+flip3"
    assert pc.arm_augment("levelset", "simclr-invariant") == "shift+flip3+rot4"
    assert pc.arm_augment("blob", "e-simclr") == pc.arm_augment("blob", pc.SCRATCH) == "flip3+rot4"
    assert pc.arm_augment("blob", "simclr-invariant") == "halfshift+flip3+rot4"


def test_rerun_reuses_everything_and_is_deterministic(quick_run, tmp_path):
    out = quick_run
    first = json.loads((out / "results.json").read_text())
    encoder = out / "pretrain" / "levelset_e-simclr" / "encoder.pt"
    mtime = encoder.stat().st_mtime_ns
    again = pc.run_compare(out, pc.QUICK, log=lambda _: None)
    assert encoder.stat().st_mtime_ns == mtime  # reused, not retrained
    assert again["errors"] == first["errors"]
    # from nothing, in another folder, on two worker processes: the same numbers (seeded everything)
    fresh = pc.run_compare(tmp_path / "fresh", dataclasses.replace(pc.QUICK, kinds=("levelset",), ablations=(),
                                                                   jobs=2), log=lambda _: None)
    assert fresh["errors"]["finetune"]["levelset"] == first["errors"]["finetune"]["levelset"]


def _square(x: int) -> int:
    return x * x


def test_worker_pool_returns_every_result():
    tasks = [pc.Task(f"t{i}", _square, (i,), cost=i) for i in range(5)]
    assert pc.run_tasks(tasks, 2, lambda _: None, 0.0) == {f"t{i}": i * i for i in range(5)}


def test_changed_settings_do_not_reuse_a_run(quick_run):
    changed = dataclasses.replace(pc.QUICK, pretrain_epochs=2, kinds=("blob",))
    with pytest.raises(UserError, match="other settings"):
        pc.run_compare(quick_run, changed, log=lambda _: None)


def test_epoch_cap():
    s = dataclasses.replace(pc.CPU, regress_epochs=100, regress_sample_budget=20000)
    assert [s.epochs_for(n) for n in (50, 200, 800, 3000)] == [100, 100, 25, 7]
    assert dataclasses.replace(s, regress_sample_budget=None).epochs_for(3000) == 100


def test_user_errors(tmp_path, capsys):
    assert pc.main(["--out", str(tmp_path), "--quick", "--n-labels", "1000"]) == 2
    assert "exceeds the train file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        pc.main(["--n-labels", "a,b"])
    assert exc.value.code == 2
