"""Benchmark of labelled photonic-crystal data generation: essl's batched PWE solver vs legume-gme, side by side.

Protocol (one process, one run, same cells):

* cells: ``n_structures`` 32×32 maps from :mod:`essl.photonics.unitcell` (``kind``, seed 0);
* ours: :func:`essl.photonics.dos.compute_labels` with its defaults (10 TM bands, circular cutoff |G| ≤ 5 = 81
  plane waves, complex64, 20×20 k-grid halved by time reversal = 200 k-points, group velocities, GGR DOS, target;
  the reduced-basis solver, :mod:`essl.photonics.reduced`, for cells with many irreducible k-points): the full
  labelled-generation cost, structures/s, and how far its labels are from the direct solver's;
* legume-gme: ``PlaneWaveExp`` (its own matrix assembly, ``numpy.linalg.eigh`` per k-point) on the same cells
  and the same 200 k-points, TM, 10 bands — band solving only, no DOS (so the ratio is conservative). legume is
  given the *same* Fourier coefficients (the exact transform of the pixel map, through a small ``Layer`` subclass),
  and its square plane-wave set |g_x|, |g_y| ≤ gmax is chosen as the smallest one whose band error is no larger
  than ours ("equal accuracy"): the error of both is measured against a converged reference (our solver,
  |G| ≤ 10, complex128) at a few k-points on the same cells;
* timings are medians over ``repeats``; both sides run with the same number of CPU threads (``threads``).

Also measured: structures/s versus batch size and versus plane-wave count (cutoff), and bands-only throughput.
``tiny=True`` shrinks everything to run in seconds (used by tests).

Run: ``python -m essl.eval.bench_solver [--n 16] [--kind levelset] [--device cpu] [--no-legume] [--tiny]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from essl.photonics import dos, pwe, unitcell

REFERENCE_CUTOFF = 10
"""Cutoff of the converged reference used to match accuracies (|G| ≤ 10, 317 plane waves)."""
ACCURACY_KPOINTS = torch.tensor([[0.5, 0.0], [0.5, 0.5], [0.17, 0.29], [-0.31, 0.06]], dtype=torch.float64)
LEGUME_GMAX_CANDIDATES = (3, 4, 5, 6, 7)


def _pixel_ft(eps_map: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Exact Fourier coefficients (1/A)∫ε e^{-2πi g·r} of a pixel map (rows = y) at integer vectors g (2, N):
    the DFT times the transform of one pixel (an independent numpy version of essl.photonics.pwe's rule)."""
    n = eps_map.shape[0]
    spec = np.fft.fft2(eps_map) / n**2
    gx, gy = g
    box = lambda t: np.sinc(t / n) * np.exp(-1j * np.pi * t / n)  # noqa: E731
    return spec[np.mod(gy, n), np.mod(gx, n)] * box(gx) * box(gy)


def legume_solver_for_map(eps_map: np.ndarray, gmax: float):
    """legume-gme ``PlaneWaveExp`` for a pixel map (square lattice, a = 1), fed the exact pixel coefficients."""
    import legume
    from legume.phc.layer import Layer

    class PixelLayer(Layer):
        def __init__(self, lattice, eps):
            super().__init__(lattice)
            self.eps_b = float(eps.mean())
            self.eps_avg = self.eps_b
            self.layer_type = "pixel"
            self._eps = np.asarray(eps, dtype=np.float64)

        def compute_ft(self, gvec):
            g = np.rint(np.asarray(gvec) / (2 * np.pi)).astype(np.int64)  # legume: G in 1/a
            return _pixel_ft(self._eps, g)

    return legume.PlaneWaveExp(PixelLayer(legume.Lattice("square"), eps_map), gmax=gmax)


def _legume_bands(cells: np.ndarray, kpoints: torch.Tensor, gmax: float, n_bands: int) -> np.ndarray:
    k = 2 * np.pi * kpoints.numpy().T  # (2, K) in 1/a
    out = []
    for cell in cells:
        solver = legume_solver_for_map(cell, gmax)
        solver.run(kpoints=k, pol="tm", numeig=n_bands)
        out.append(np.asarray(solver.freqs))
    return np.stack(out)  # (N, K, n_bands)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _threads(n: int):
    """Limit the BLAS behind numpy / scipy (legume) to n threads; torch's threads are set by ``num_threads``.

    Not the OpenMP runtime: a threadpoolctl limit on torch's libgomp, once torch has run parallel code, made torch's
    batched eigensolvers 8-9× slower (measured: 0.47 s -> 4.5 s for 8 cells), which is what one ``essl bench all``
    run showed after the training section."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


VARIANTS = {
    "torch eigh, full k-grid (before)": dict(
        eigensolver="torch", real_inversion=False, kpoint_symmetry=False, band_solver="direct"
    ),
    "+ LAPACK subset eigensolver": dict(
        eigensolver="lapack", real_inversion=False, kpoint_symmetry=False, band_solver="direct"
    ),
    "+ exact cell symmetry (k-points, real)": dict(
        eigensolver="auto", real_inversion=True, kpoint_symmetry=True, band_solver="direct"
    ),
    "+ reduced basis (Rayleigh-Ritz on patches, default)": dict(band_solver="auto"),
}
"""Label variants timed side by side (the last one is compute_labels' default)."""


def bench_solver(
    n_structures: int = 16,
    kind: str = "levelset",
    device: str = "cpu",
    compare_legume: bool = True,
    repeats: int = 3,
    kgrid: int = dos.DEFAULT_KGRID,
    cutoff: int = pwe.DEFAULT_CUTOFF,
    n_bands: int = 10,
    threads: int = 1,
    scaling: bool = True,
    tiny: bool = False,
    variants: bool = True,
) -> dict:
    """Measure labelled-generation speed (module docstring). Returns a dict of plain numbers:

    ``ours_structs_per_s``, ``ours_bands_only_structs_per_s``, ``legume_structs_per_s``, ``speedup``,
    ``ours_error`` / ``legume_error`` (max relative band error vs the reference), ``legume_gmax``,
    ``n_plane_waves_ours`` / ``n_plane_waves_legume``, ``batch_scaling`` {batch: structs/s} and
    ``cutoff_scaling`` {n_plane_waves: structs/s}, ``vs_direct_label_rel_l1`` / ``vs_direct_band_rel_max`` /
    ``vs_direct_band_rel_median`` (the default labels against ``band_solver="direct"``), ``variants``
    {name: structs/s} (each speed-up step of :data:`VARIANTS`, timed interleaved with the default and legume),
    ``n_kpoints_solved`` (k-points actually solved per structure after the symmetry reduction, mean),
    ``speedup_same_kpoints`` (against legume given the same reduced k-points, its time scaled by the k-point
    ratio), plus the settings.
    """
    if tiny:
        n_structures, repeats, kgrid = min(n_structures, 2), 1, 4
    cells_np = unitcell.generate_cells(kind, n_structures, seed=0)  # (N, 32, 32) float32
    cells = torch.from_numpy(cells_np).to(device)
    n_k = len(pwe.kgrid(kgrid)[0])
    solved = [len(pwe.irreducible_kgrid(kgrid, tuple(o))[0]) for o in pwe.cell_symmetries(cells)]
    result: dict = {
        "kind": kind,
        "n_structures": n_structures,
        "device": device,
        "threads": threads,
        "kgrid": kgrid,
        "n_kpoints": n_k,
        "n_kpoints_solved": sum(solved) / len(solved),
        "cutoff": cutoff,
        "n_bands": n_bands,
        "n_plane_waves_ours": pwe.n_plane_waves(cutoff),
    }
    with _threads(threads):

        def label(x, **kw):
            return dos.compute_labels(x, kgrid=kgrid, cutoff=cutoff, n_bands=n_bands, num_threads=threads, **kw)

        label(cells[:1])  # warm-up
        # what the default (reduced-basis) solver changes against the direct one, on the same cells
        lab, lab_direct = label(cells), label(cells, band_solver="direct")
        dev = (lab["bands"] - lab_direct["bands"]).abs() / lab_direct["bands"].clamp_min(1e-3)
        result["vs_direct_label_rel_l1"] = float(dos.relative_l1(lab["target"], lab_direct["target"]))
        result["vs_direct_band_rel_max"] = float(dev.max())
        result["vs_direct_band_rel_median"] = float(dev.median())
        kpts, _ = pwe.kgrid(kgrid)
        # every timed job, run round-robin `repeats` times so that load changes on a shared machine hit all alike
        jobs = {"ours": lambda: label(cells)}
        jobs["bands"] = lambda: pwe.solve_bands(cells, kpts, n_bands, cutoff=cutoff, num_threads=threads)
        if variants and device == "cpu":
            for name, kw in VARIANTS.items():
                jobs[name] = lambda kw=kw: label(cells, **kw)

        if compare_legume:
            # equal accuracy: errors against a converged reference at a few k-points, on the same cells
            m_acc = 2 if tiny else min(n_structures, 4)
            ref = pwe.solve_bands(
                cells[:m_acc].cpu(),
                ACCURACY_KPOINTS,
                n_bands,
                cutoff=REFERENCE_CUTOFF,
                dtype=torch.complex128,
                num_threads=threads,
            ).numpy()
            ours = (
                pwe.solve_bands(cells[:m_acc].cpu(), ACCURACY_KPOINTS, n_bands, cutoff=cutoff, num_threads=threads)
                .double()
                .numpy()
            )
            err_ours = float(np.max(np.abs(ours - ref) / ref))
            chosen, err_leg = None, None
            for gmax in LEGUME_GMAX_CANDIDATES:
                leg = _legume_bands(cells_np[:m_acc].astype(np.float64), ACCURACY_KPOINTS, gmax, n_bands)
                err_leg = float(np.max(np.abs(leg - ref) / ref))
                chosen = gmax
                if err_leg <= err_ours:
                    break
            result.update(
                ours_error=err_ours,
                legume_error=err_leg,
                legume_gmax=chosen,
                n_plane_waves_legume=(2 * chosen + 1) ** 2,
            )
            cells64 = cells_np.astype(np.float64)
            n_leg = n_structures if not tiny else 1
            jobs["legume"] = lambda: _legume_bands(cells64[:n_leg], kpts, chosen, n_bands)

        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(repeats):
            for name, fn in jobs.items():
                times[name].append(_median_time(fn, 1))
        t = {name: statistics.median(v) for name, v in times.items()}
        result["ours_structs_per_s"] = n_structures / t["ours"]
        result["ours_bands_only_structs_per_s"] = n_structures / t["bands"]
        result["variants"] = {name: n_structures / t[name] for name in VARIANTS if name in t}
        if compare_legume:
            result["legume_structs_per_s"] = n_leg / t["legume"]
            result["speedup"] = result["ours_structs_per_s"] / result["legume_structs_per_s"]
            result["speedup_bands_only"] = result["ours_bands_only_structs_per_s"] / result["legume_structs_per_s"]
            # legume handed the same symmetry-reduced k-points: its cost is per k-point (one eigh each)
            result["speedup_same_kpoints"] = result["speedup"] * result["n_kpoints_solved"] / n_k

        if scaling:
            batches = [1, 2] if tiny else sorted({1, 4, n_structures})
            result["batch_scaling"] = {
                b: b / _median_time(lambda b=b: label(cells[:b]), repeats) for b in batches if b <= n_structures
            }
            cutoffs = [3, 4] if tiny else [4, 5, 6, 7]
            result["cutoff_scaling"] = {
                pwe.n_plane_waves(m): n_structures
                / _median_time(
                    lambda m=m: dos.compute_labels(cells, kgrid=kgrid, cutoff=m, n_bands=n_bands, num_threads=threads),
                    repeats,
                )
                for m in cutoffs
            }
    return result


def format_table(r: dict) -> str:
    lines = [
        f"labelled generation, {r['kind']} 32×32, {r['n_bands']} TM bands, {r['n_kpoints']} k-points "
        f"({r['kgrid']}×{r['kgrid']} grid, time reversal; {r['n_kpoints_solved']:.0f} solved per structure after the "
        f"cell-symmetry reduction), {r['device']}, {r['threads']} thread(s), {r['n_structures']} structures",
        "",
        "| solver | plane waves | max band error | structures/s |",
        "|---|---|---|---|",
        f"| essl pwe + GGR DOS (labels) | {r['n_plane_waves_ours']} (|G| ≤ {r['cutoff']}) | "
        f"{r.get('ours_error', float('nan')):.1e} | {r['ours_structs_per_s']:.2f} |",
        f"| essl pwe, bands only (full half grid) | {r['n_plane_waves_ours']} | | "
        f"{r['ours_bands_only_structs_per_s']:.2f} |",
    ]
    for name, v in r.get("variants", {}).items():
        lines.append(f"| labels: {name} | {r['n_plane_waves_ours']} | | {v:.2f} |")
    if "legume_structs_per_s" in r:
        lines.append(
            f"| legume-gme PlaneWaveExp, bands only ({r['n_kpoints']} k) | {r['n_plane_waves_legume']} "
            f"(|g_i| ≤ {r['legume_gmax']}) | {r['legume_error']:.1e} | {r['legume_structs_per_s']:.2f} |"
        )
        lines.append("")
        lines.append(
            f"speed-up (labels vs legume bands): {r['speedup']:.1f}×; bands vs bands: {r['speedup_bands_only']:.1f}×;"
            f" vs legume given the same symmetry-reduced k-points: {r['speedup_same_kpoints']:.1f}×"
        )
    if "vs_direct_label_rel_l1" in r:
        lines.append("")
        lines.append(
            "default labels vs the direct solver on the same cells: target relative L1 "
            f"{r['vs_direct_label_rel_l1']:.1e};"
            f" band deviation median {r['vs_direct_band_rel_median']:.1e}, max {r['vs_direct_band_rel_max']:.1e}"
            " (relative, frequencies below 1e-3 counted absolutely)"
        )
    if "batch_scaling" in r:
        lines.append("")
        lines.append("batch size -> structures/s: " + ", ".join(f"{b}: {v:.2f}" for b, v in r["batch_scaling"].items()))
        lines.append(
            "plane waves -> structures/s: " + ", ".join(f"{p}: {v:.2f}" for p, v in r["cutoff_scaling"].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--kind", default="levelset", choices=unitcell.KINDS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-legume", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-scaling", action="store_true")
    args = ap.parse_args(argv)
    r = bench_solver(
        args.n,
        args.kind,
        args.device,
        not args.no_legume,
        args.repeats,
        threads=args.threads,
        tiny=args.tiny,
        scaling=not args.no_scaling,
    )
    print(format_table(r))


if __name__ == "__main__":
    main()
