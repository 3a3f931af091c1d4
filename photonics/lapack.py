"""CPU subset eigensolver: LAPACK's MRRR (?heevr / ?syevr via scipy) for the lowest eigenpairs of a stack of
Hermitian / real symmetric matrices, one matrix at a time in an aligned buffer (batch-independent bit for bit).
Used by :mod:`essl.photonics.pwe` (direct solves) and :mod:`essl.photonics.reduced` (seed solves). Also the
Cholesky factorisation both use, without a host read on a GPU (:func:`cholesky`)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

_BLAS_CONTROLLER = None


def _blas_threads(n: int):
    """Limit the BLAS behind scipy (OpenBLAS, separate from torch's MKL) to n threads; threadpoolctl's controller
    is built once (its first inspection of the loaded libraries takes ~20-100 ms, a limit afterwards ~40 µs).
    Without it, OpenBLAS's default of one thread per core made a 1-thread label run on a busy 2-core machine
    ~100× slower (measured: 11 s instead of ~0.1 s per structure)."""
    global _BLAS_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=n, user_api="blas")


def lapack_available() -> bool:
    """Whether scipy's LAPACK wrappers (the CPU subset eigensolver) can be imported."""
    try:
        from scipy.linalg import lapack  # noqa: F401
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return False
    return True


def lapack_lowest(mats: torch.Tensor, n_bands: int, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lowest ``n_bands`` eigenpairs of a stack of Hermitian / real symmetric CPU matrices (m, P, P), one LAPACK
    ?heevr / ?syevr call (MRRR, subset by index) per matrix, with torch's CPU thread count for the BLAS. Every
    matrix is copied into one 64-byte-aligned column-major buffer that LAPACK overwrites, so each result depends
    only on its own matrix, bit for bit."""
    from scipy.linalg import lapack

    a = mats.detach().numpy()
    m, p = a.shape[0], a.shape[-1]
    fn = {
        np.dtype(np.complex64): lapack.cheevr,
        np.dtype(np.complex128): lapack.zheevr,
        np.dtype(np.float32): lapack.ssyevr,
        np.dtype(np.float64): lapack.dsyevr,
    }[a.dtype]
    raw = np.empty(p * p * a.itemsize + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    buf = raw[off : off + p * p * a.itemsize].view(a.dtype).reshape(p, p).T  # Fortran order, aligned
    lam = np.empty((m, n_bands), dtype=np.finfo(a.dtype).dtype)
    vec = np.empty((m, p, n_bands), dtype=a.dtype) if vectors else None
    with _blas_threads(torch.get_num_threads()):
        for i in range(m):
            buf.T[...] = a[i]  # buf = a[i]ᵀ = conj(a[i]) (Hermitian): same eigenvalues, conjugated eigenvectors
            w, z, found, _, info = fn(buf, compute_v=int(vectors), range="I", il=1, iu=n_bands, overwrite_a=1)
            if info != 0 or found != n_bands:
                raise RuntimeError(f"LAPACK {fn.__name__} failed (info={info}, found {found} of {n_bands} eigenvalues)")
            lam[i] = w[:n_bands]
            if vectors:
                np.conjugate(z, out=vec[i]) if a.dtype.kind == "c" else np.copyto(vec[i], z)
    return torch.from_numpy(lam), (torch.from_numpy(vec) if vectors else None)


def cholesky(e: torch.Tensor) -> torch.Tensor:
    """Cholesky factor L (lower) of Hermitian positive definite matrices (..., P, P), without the blocking host read
    of ``torch.linalg.cholesky`` on a GPU (it reads LAPACK's status to raise). [ε] of a real map ε > 0 is positive
    definite (a Gram matrix of ∫ε|u|²), and :func:`essl.photonics.pwe.solve_bands` refuses any other map; a
    failure would give non-finite bands, which the dataset writer refuses (:mod:`essl.photonics.dataset`)."""
    return torch.linalg.cholesky_ex(e, check_errors=False).L
