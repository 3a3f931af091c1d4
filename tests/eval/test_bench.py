"""essl.eval.bench: every section runs in quick mode and emits its JSON (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

from essl.eval import bench


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_memory(mem: dict) -> None:
    for key in ("peak_rss_mb", "ru_maxrss_mb"):
        assert _positive(mem[key]), (key, mem)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Each section once, in quick mode, as returned and as written to JSON (alone in its folder: atomic)."""
    out = {}
    for section in bench.SECTIONS:
        path = tmp_path_factory.mktemp(section) / "bench.json"
        result = bench.run_bench(section, device="cpu", json_path=str(path), quick=True)
        assert [p.name for p in path.parent.iterdir()] == ["bench.json"]
        out[section] = (result, json.loads(path.read_text()))
    return out


def test_machine_and_json_match(quick_runs):
    for section, (result, written) in quick_runs.items():
        assert written == result
        m = written["machine"]
        assert m["cpu_count"] >= 1 and m["device"] == "cpu" and m["torch"]
        assert written["settings"]["quick"] is True and written["settings"]["which"] == section
        assert set(bench.SECTIONS) & set(written) == {section}
        assert _positive(written[section]["wall_s"])


def test_pipeline_section(quick_runs):
    p = quick_runs["pipeline"][1]["pipeline"]
    for key in ("essl_images_per_s", "reference_images_per_s", "speedup", "batch", "reference_workers"):
        assert _positive(p[key]), key
    _check_memory(p["memory"])
    assert p["memory"]["peak_rss_workers_mb"] > 0  # the reference's DataLoader workers were seen


def test_train_section(quick_runs):
    tr = quick_runs["train"][1]["train"]
    for name in bench.QUICK_BACKBONES:
        r = tr[name]
        assert _positive(r["essl_overhead"]) and _positive(r["batch"])
        for method in ("simclr", "e_simclr"):
            for key in ("step_ms", "images_per_s", "augment_ms", "augment_share"):
                assert _positive(r[method][key]), (name, method, key)
        _check_memory(r["memory"])


def test_solver_section(quick_runs):
    s = quick_runs["solver"][1]["solver"]
    assert _positive(s["ours_structs_per_s"])
    if s["legume_installed"]:
        assert _positive(s["legume_structs_per_s"]) and _positive(s["speedup"])
    _check_memory(s["memory"])


def test_format_bench_has_every_section(quick_runs):
    merged = dict(quick_runs["pipeline"][1])
    for section in bench.SECTIONS[1:]:
        merged[section] = quick_runs[section][1][section]
    text = bench.format_bench(merged)
    for heading in ("**Augmentation**", "**Training step**", "**Band solver**", "| small_cnn |", "QUICK",
                    "**Host syncs**", "**Loader**"):
        assert heading in text, heading


def test_train_section_counts_host_reads(quick_runs):
    for name in bench.QUICK_BACKBONES:
        assert quick_runs["train"][1]["train"][name]["e_simclr"]["host_reads_per_step"] == 0


def test_hostsync_section(quick_runs):
    """Before: kornia's and lightly's ops read back (ColorJitter, and the blur of E-BYOL); after: none."""
    h = quick_runs["hostsync"][1]["hostsync"]
    for config in bench.QUICK_HOSTSYNC_CONFIGS:
        r = h[f"{config}/{bench.QUICK_BACKBONES[0]}"]
        assert r["reads_after"] == 0 and r["reads_before"] > 0
        assert _positive(r["step_ms_before"]) and _positive(r["step_ms_after"])
        assert any("color_jitter" in site for site in r["sites_before"])
    assert h["e-byol/small_cnn"]["reads_before"] > h["e-simclr/small_cnn"]["reads_before"]  # + the blurs


def test_loader_section(quick_runs):
    ld = quick_runs["loader"][1]["loader"]
    assert ld["images"] == bench.QUICK_LOADER_IMAGES and ld["image_size"] == bench.QUICK_LOADER_IMAGE_SIZE
    assert all(_positive(v) for v in ld["images_per_s_by_workers"].values())
    assert _positive(ld["per_worker_images_per_s"]) and _positive(ld["startup_s"]) and _positive(ld["jpeg_kb_mean"])
    assert "workers_needed" not in ld  # the GPU step rate is measured on a GPU only
    _check_memory(ld["memory"])


def test_folder_benchmark_quick(tmp_path):
    """``python -m essl.eval.bench folder`` (not part of ``all``): start-up and memory in fresh processes."""
    r = bench.run_bench("folder", device="cpu", quick=True, json_path=str(tmp_path / "folder.json"))
    runs = r["folder"]["runs"]
    assert sorted(runs, key=int) == [str(n) for n in bench.QUICK_FOLDER_SIZES]
    for per_size in runs.values():
        for kind in ("lazy_cold", "lazy_warm", "in_memory"):
            probe = per_size[kind]
            assert probe["batch_shape"][1:] == [3, bench.FOLDER_IMAGE_PX, bench.FOLDER_IMAGE_PX]
            assert _positive(probe["first_batch_s"]) and _positive(probe["peak_rss_mb"])
        assert per_size["lazy_warm"]["data_s"] <= per_size["lazy_cold"]["data_s"] + 1.0  # cached statistics
    assert "**Large folder**" in bench.format_bench(r)


def test_cli_bench_all_on_cpu_is_the_gpu_code_path(tmp_path, capsys):
    """`essl bench all --device cuda --json ...` is what a GPU user runs; the same code, quick, on the CPU."""
    from essl.cli import main

    out = tmp_path / "all.json"
    assert main(["bench", "all", "--device", "cpu", "--quick", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(bench.SECTIONS) <= set(written)
    assert written["hostsync"]["e-simclr/small_cnn"]["reads_after"] == 0
    assert "structures/s" in capsys.readouterr().out


def test_unknown_section_and_bad_repeats_are_errors():
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.run_bench("nope", device="cpu", quick=True)
    with pytest.raises(ValueError, match="repeats"):
        bench.run_bench("pipeline", device="cpu", quick=True, repeats=0)


def test_jsonable():
    obj = bench._jsonable({1: float("nan"), "t": (1.5, float("inf")), "ok": 2})
    assert obj == {"1": None, "t": [1.5, None], "ok": 2}
    json.dumps(obj, allow_nan=False)
