"""Bayes-optimal accuracy of the E-SSL prediction task on photonic unit cells: which labels can be told apart.

E-SSL (Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022) trains a head to predict which element
g of a small group G (:mod:`essl.transforms`) was applied to an input. In the photonics experiments of the paper
the head predicts the half-cell translation (G = translate, grid 2) of **blob** cells and the 4-fold rotation
(G = rot4) of **level-set** cells (plane group pm). Whether such a task carries signal depends on the *data
distribution*: if a transformation h leaves the distribution of the generated cells unchanged, then g and g·h
produce identically distributed inputs and no classifier can tell them apart. This module computes, exactly,
the best accuracy any classifier can reach (the Bayes limit) and says which labels merge.

The group W. Every operation involved (the labelled elements of G, the invariance operations of
:data:`essl.augment.LATTICE_OPS` applied to the equivariance input, and the symmetries of the generators) is a
pixel permutation of an N×N periodic cell, an element of W = C4v ⋉ Z_N²: a point operation about the cell centre
followed by an integer periodic shift. Because the generators sample at pixel *centres*
(:mod:`essl.photonics.unitcell`), the 8 array operations of C4v are the exact point symmetries of the continuous
cell about (½, ½), and a shift by s pixels is the lattice translation s/N: W acts on the maps without any
interpolation. An element is stored as one integer ``code = m·N² + s_row·N + s_col`` and acts on pixel indices
p = (row, col) as  p ↦ M_m (p − c) + c + s  (mod N), c = ((N−1)/2, (N−1)/2); composition and inverses are
integer arithmetic (:class:`LatticeGroup`), and :meth:`LatticeGroup.permutation` turns an element into the exact
pixel permutation, which the tests compare with ``torch.rot90``/``torch.flip``/``torch.roll``. The point index m
uses the ``c4v`` label convention of :mod:`essl.transforms`: m = 4f + k is "rotate by k counter-clockwise quarter
turns, then flip the columns if f = 1".

The data symmetry H. :func:`generator_symmetry` gives the subgroup H ⊂ W under which the generator's
*distribution* is invariant (derived per generator in its docstring; the tests verify every claimed element bit
for bit through a measure-preserving map of the generator's random parameters, and show that elements outside H
move generated cells off the generator's support).

The limit. Let y = g·a·x with x ~ p (H-invariant), a ~ A (the equivariance-input operations, in order) and g
uniform on G. Partition W into left cosets wH. Given the coset C of g·a, y is distributed as w_C·x whatever g and
a were (x and h·x have the same law for h ∈ H), so an oracle that also sees C can do no better than predict
argmax_g P(g·a ∈ C), and a classifier that sees only y can do no better than the oracle:

    accuracy ≤ (1/|G|) Σ_C max_g P_a(g·a ∈ C).

This bound needs nothing but the H-invariance. It is attained when the coset can be read off y, i.e. when no
element outside H maps a generated cell onto the generator's support (genericity); :func:`genericity` measures
how often that fails on real samples. With no equivariance-input operations the limit is 1/|G ∩ H|: g and g′
merge exactly when g⁻¹g′ ∈ H.

Everything is exact integer arithmetic (the operation distributions are uniform, so the probabilities are
counts); the accuracy is also returned as a :class:`fractions.Fraction`. The limit does not depend on N beyond
its divisibility (the cosets that matter are the same for N = 8 and N = 32; checked in the tests), but the
default is the generators' real grid, 32 × 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from essl import transforms
from essl.errors import UserError
from essl.photonics import unitcell

# ----------------------------------------------------------------------------------------------- the group W

N_POINT = 8
"""Order of the point group C4v (4 rotations, 4 mirrors)."""

N_ROTATIONS = 4
"""Quarter turns in C4v; point index m = N_ROTATIONS·f + k (rotate by k, then flip columns if f = 1)."""

_ROT90 = np.array([[0, -1], [1, 0]])
"""A counter-clockwise quarter turn (``torch.rot90(x, 1)``) on centred (row, col) pixel coordinates: output pixel
(-u_col, u_row) reads input pixel (u_row, u_col)."""

_FLIP_COLS = np.array([[1, 0], [0, -1]])
"""``flip(-1)``: the column mirror x -> 1 - x."""


def _point_matrices() -> np.ndarray:
    """(8, 2, 2) int: M_m = F^f R^k for m = 4f + k (the ``c4v`` label order of :mod:`essl.transforms`)."""
    mats = []
    for f in range(2):
        for k in range(N_ROTATIONS):
            mats.append(np.linalg.matrix_power(_FLIP_COLS, f) @ np.linalg.matrix_power(_ROT90, k))
    return np.stack(mats).astype(np.int64)


POINT_MATRICES = _point_matrices()


def _point_table(mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multiplication table (8, 8) and inverses (8,) of the point group, by matrix lookup."""
    flat = {tuple(m.ravel()): i for i, m in enumerate(mats)}
    prod = np.array([[flat[tuple((a @ b).ravel())] for b in mats] for a in mats])
    inv = np.array([flat[tuple(np.round(np.linalg.inv(a)).astype(np.int64).ravel())] for a in mats])
    return prod, inv


POINT_PRODUCT, POINT_INVERSE = _point_table(POINT_MATRICES)

POINT_NAMES = ("rot0", "rot90", "rot180", "rot270", "flipW", "antitranspose", "flipH", "transpose")
"""Names of the point operations m = 0..7. flipW = ``flip(-1)`` (columns, x -> 1 - x), flipH = ``flip(-2)``
(rows), transpose = rows <-> columns, antitranspose = the other diagonal."""

ROT90, ROT180, FLIP_W, FLIP_H = 1, 2, 4, 6
"""Point indices of the quarter and half turns and of the column and row mirrors."""


class LatticeGroup:
    """W = C4v ⋉ Z_N² acting on N×N periodic pixel maps; elements are integer codes ``m·N² + s_row·N + s_col``.

    An element (m, s) maps pixel p to M_m (p − c) + c + s (mod N), c the cell centre: the point operation about the
    centre first, then the periodic shift by s (``torch.roll(x, s)``). For a square grid M_m (p − c) + c =
    M_m p + d_m with integer d_m ∈ {0, N−1}², so everything stays in integers mod N. Composition
    (m1, s1)∘(m2, s2) = (m1 m2, M_m1 s2 + s1) is the semidirect product; ``compose(a, b)`` applies b first.
    """

    def __init__(self, size: int):
        if int(size) != size or size < 2:
            raise UserError(f"lattice group: size={size!r} must be an integer >= 2")
        self.size = n = int(size)
        self.order = N_POINT * n * n
        ones = np.ones(2, dtype=np.int64)
        self._offset = ((n - 1) * (ones[None, :] - POINT_MATRICES @ ones)) // 2  # (8, 2): d_m = c − M_m c
        self._cosets: dict[bytes, np.ndarray] = {}

    # -- codes
    def code(self, point: int | np.ndarray, shift=(0, 0)) -> np.ndarray:
        """Code(s) of (point index, shift (rows, cols))."""
        s = np.asarray(shift, dtype=np.int64) % self.size
        return np.asarray(point, dtype=np.int64) * self.size**2 + s[..., 0] * self.size + s[..., 1]

    def split(self, codes) -> tuple[np.ndarray, np.ndarray]:
        """codes -> (point indices, shifts (..., 2))."""
        codes = np.asarray(codes, dtype=np.int64)
        n = self.size
        return codes // (n * n), np.stack([(codes // n) % n, codes % n], axis=-1)

    def elements(self) -> np.ndarray:
        return np.arange(self.order, dtype=np.int64)

    def translations(self) -> np.ndarray:
        """Codes of the N² pure shifts."""
        return np.arange(self.size**2, dtype=np.int64)

    def point_group(self) -> np.ndarray:
        """Codes of C4v about the cell centre (no shift), in point-index order."""
        return self.code(np.arange(N_POINT))

    # -- group law
    def compose(self, a, b) -> np.ndarray:
        """a∘b (apply b, then a), broadcasting over code arrays."""
        ma, sa = self.split(a)
        mb, sb = self.split(b)
        s = np.einsum("...ij,...j->...i", POINT_MATRICES[ma], sb) + sa
        return self.code(POINT_PRODUCT[ma, mb], s)

    def inverse(self, a) -> np.ndarray:
        m, s = self.split(a)
        mi = POINT_INVERSE[m]
        return self.code(mi, -np.einsum("...ij,...j->...i", POINT_MATRICES[mi], s))

    def closure(self, generators) -> np.ndarray:
        """Sorted codes of the subgroup generated by ``generators`` (breadth-first, vectorised)."""
        gens = np.unique(np.asarray(generators, dtype=np.int64).ravel())
        member = np.zeros(self.order, dtype=bool)
        member[0] = True  # the identity
        frontier = np.array([0], dtype=np.int64)
        while frontier.size:
            new = np.unique(self.compose(gens[:, None], frontier[None, :]).ravel())
            new = new[~member[new]]
            member[new] = True
            frontier = new
        return np.flatnonzero(member)

    # -- action on pixel maps
    def destination(self, a) -> np.ndarray:
        """(..., N²): flat index of the pixel that pixel p (flat) is moved to by element a."""
        m, s = self.split(a)
        n = self.size
        rows, cols = np.divmod(np.arange(n * n), n)
        p = np.stack([rows, cols], axis=-1)  # (N², 2)
        q = np.einsum("...ij,pj->...pi", POINT_MATRICES[m], p) + (self._offset[m] + s)[..., None, :]
        q %= n
        return q[..., 0] * n + q[..., 1]

    def permutation(self, a) -> np.ndarray:
        """(..., N²) source index: ``(a·x).flat[q] == x.flat[permutation(a)[q]]``, i.e. (a·x)(q) = x(a⁻¹q)."""
        return self.destination(self.inverse(a))

    def act(self, a: int, x: np.ndarray) -> np.ndarray:
        """a·x for maps x of shape (..., N, N): the exact pixel permutation (no interpolation)."""
        n = self.size
        flat = x.reshape(*x.shape[:-2], n * n)
        return flat[..., self.permutation(a)].reshape(x.shape)

    # -- names
    def name(self, a: int) -> str:
        m, s = self.split(a)
        m, s = int(m), tuple(int(v) for v in s)
        if s == (0, 0):
            return POINT_NAMES[m]
        shift = f"shift{s}"
        return shift if m == 0 else f"{shift}∘{POINT_NAMES[m]}"

    # -- cosets
    def left_cosets(self, subgroup) -> np.ndarray:
        """(order,) label of the left coset wH of every element w (labels 0, 1, ... in order of first element);
        cached per subgroup, read-only."""
        sub = np.unique(np.asarray(subgroup, dtype=np.int64))
        key = sub.tobytes()
        if key not in self._cosets:
            self._cosets[key] = self._left_cosets(sub)
        return self._cosets[key]

    def _left_cosets(self, sub: np.ndarray) -> np.ndarray:
        labels = np.full(self.order, -1, dtype=np.int64)
        count = 0
        for w in range(self.order):
            if labels[w] < 0:
                labels[self.compose(w, sub)] = count
                count += 1
        labels.flags.writeable = False
        return labels


@lru_cache(maxsize=8)
def lattice_group(size: int) -> LatticeGroup:
    return LatticeGroup(size)


# -------------------------------------------------------------------------- G and the eq-input operations

def group_elements(group: str, grid: int = 2, size: int = unitcell.DEFAULT_SIZE) -> np.ndarray:
    """Codes of the elements of an :mod:`essl.transforms` group, in label order (label g -> element ``[g]``)."""
    w = lattice_group(size)
    n_classes = transforms.group_size(group, grid)  # validates the name
    if group == "rot4":
        return w.code(np.arange(N_ROTATIONS))
    if group == "flip4":  # none, flip W (columns), flip H (rows), both
        return w.code(np.array([0, FLIP_W, FLIP_H, ROT180]))
    if group == "c4v":
        return w.code(np.arange(N_POINT))
    if size % grid:
        raise UserError(f"translate with grid {grid} needs the size divisible by it, got {size}")
    step = size // grid
    ij = np.stack(np.divmod(np.arange(n_classes), grid), axis=-1) * step
    return w.code(np.zeros(n_classes, dtype=np.int64), ij)


EQ_OPS = ("c4v", "flip4", "flip3", "rot4", "shift", "halfshift")
"""Operations that may be applied to the equivariance input before g: :data:`essl.augment.LATTICE_OPS` plus
``flip3``, the reference code's three-way flip (none, rows or columns, uniformly)."""


def op_elements(op: str, size: int = unitcell.DEFAULT_SIZE) -> np.ndarray:
    """Codes of the (uniformly drawn) elements of one invariance operation of :data:`EQ_OPS`."""
    w = lattice_group(size)
    if op in ("c4v", "flip4", "rot4"):
        return group_elements(op, size=size)
    if op == "flip3":
        return w.code(np.array([0, FLIP_H, FLIP_W]))
    if op == "shift":
        return w.translations()
    if op == "halfshift":
        return group_elements("translate", grid=2, size=size)
    raise UserError(f"unknown lattice operation {op!r}; choose from {', '.join(EQ_OPS)}")


def eq_input_counts(ops: Sequence[str], size: int = unitcell.DEFAULT_SIZE) -> np.ndarray:
    """(|W|,) int64 counts of a = a_k ∘ … ∘ a_1 (``ops`` applied in order, each uniform and independent).

    Every op draws uniformly from its elements, so P(a) = counts[a] / Π|op|: integer counts keep it exact.
    The result is cached and read-only.
    """
    return _eq_input_counts(tuple(ops), int(size))


@lru_cache(maxsize=64)
def _eq_input_counts(ops: tuple[str, ...], size: int) -> np.ndarray:
    w = lattice_group(size)
    counts = np.zeros(w.order, dtype=np.int64)
    counts[0] = 1
    for op in ops:
        support = np.flatnonzero(counts)
        new = np.zeros_like(counts)
        products = w.compose(op_elements(op, size)[:, None], support[None, :])  # (|op|, |support|): e∘a
        np.add.at(new, products.ravel(), np.broadcast_to(counts[support], products.shape).ravel())
        counts = new
    counts.flags.writeable = False
    return counts


# ---------------------------------------------------------------------------------------------- data symmetry

def _kind_options(kind: str, options: dict) -> dict:
    """The generator's options with defaults filled in; unknown kinds or options raise UserError."""
    allowed = unitcell.generator_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"unit cell kind {kind!r}: unknown option {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    opts = {**allowed, **options}
    if kind == "levelset" and opts["symmetry"] not in unitcell.SYMMETRIES:
        known = ", ".join(unitcell.SYMMETRIES)
        raise UserError(f"unit cell option symmetry={opts['symmetry']!r}: expected one of {known}")
    return opts


def _uniform_cells(opts: dict) -> bool:
    """Both permittivities fixed and equal: every cell is one constant map (no structure at all)."""
    e_in, e_out = opts.get("eps_in"), opts.get("eps_out")
    return e_in is not None and e_out is not None and e_in == e_out


def generator_stabiliser(kind: str, size: int = unitcell.DEFAULT_SIZE, **options) -> np.ndarray:
    """K: the symmetry every generated cell has by construction (codes, sorted).

    levelset: the plane group's point operations (p1: {e}; pm: {e, flipW}; p4m: C4v), exact by
    :func:`essl.photonics.unitcell.symmetrize`; cylinder: C4v (a disc about the centre); blob: {e} (harmonics 2..5
    with random coefficients have no symmetry).
    """
    opts = _kind_options(kind, options)
    w = lattice_group(size)
    if _uniform_cells(opts):
        return w.elements()
    if kind == "cylinder":
        return w.point_group()
    if kind == "levelset":
        gens = {"p1": [], "pm": [FLIP_W], "p4m": [FLIP_W, ROT90]}[opts["symmetry"]]
        return w.closure(w.code(np.array(gens, dtype=np.int64)))
    return np.array([0], dtype=np.int64)


def normaliser(subgroup, size: int = unitcell.DEFAULT_SIZE) -> np.ndarray:
    """N_W(K) = {w : w K w⁻¹ = K} (sorted codes)."""
    w = lattice_group(size)
    k = np.asarray(subgroup, dtype=np.int64)
    member = np.zeros(w.order, dtype=bool)
    member[k] = True
    every = w.elements()
    conj = w.compose(w.compose(every[:, None], k[None, :]), w.inverse(every)[:, None])  # (|W|, |K|)
    return np.flatnonzero(member[conj].all(axis=1))


def generator_symmetry(kind: str, size: int = unitcell.DEFAULT_SIZE, **options) -> np.ndarray:
    """H: the elements of W under which the generator's distribution is invariant (sorted codes).

    * **levelset**: f(r) = Σ_G a_G cos 2πG·r + b_G sin 2πG·r over a C4v-closed set of G with iid N(0, 1)
      coefficients is a stationary, C4v-invariant Gaussian field: a shift by t rotates each pair (a_G, b_G) by
      the angle 2πG·t, a point operation permutes the G (up to sign), both orthogonal maps of iid Gaussians. So
      the unsymmetrised field is W-invariant in law. Symmetrising over the plane group's point operations K
      gives sym_K(f), and w·sym_K(f) = sym_{wKw⁻¹}(w·f): its law is unchanged if w normalises K, and changed
      otherwise (a generic cell's exact symmetry is K, that of w·x is wKw⁻¹ ≠ K). The fill quantile and the ε
      draws are independent of f and the threshold is permutation-invariant. Hence H = N_W(K): p1 -> all of
      W (no signal in *any* task!), pm -> {e, flipW, flipH, rot180} × {row shifts} × {column shifts 0, N/2}
      (8N elements), p4m -> C4v × {0, (N/2, N/2)} (16 elements).
    * **blob**: a star-shaped region about the centre with r(θ) = r0 (1 + Σ_k (a_k cos kθ + b_k sin kθ)·A/k),
      iid N(0, 1) a_k, b_k. A quarter turn maps θ -> θ ± π/2, i.e. rotates each pair (a_k, b_k) by kπ/2; a mirror
      maps θ -> π − θ, i.e. flips signs: the law is C4v-invariant. Any shift moves the centre, which the
      generator never does: H = C4v (8 elements).
    * **cylinder**: a disc about the centre: H = C4v.

    With ``eps_in == eps_out`` fixed, every cell is a constant map and H = W.
    """
    opts = _kind_options(kind, options)
    w = lattice_group(size)
    if _uniform_cells(opts):
        return w.elements()
    if kind == "levelset":
        return normaliser(generator_stabiliser(kind, size, **options), size)
    return w.point_group()


def dataset_label(kind: str, **options) -> str:
    opts = _kind_options(kind, options)
    return f"levelset {opts['symmetry']}" if kind == "levelset" else kind


# ---------------------------------------------------------------------------------------------- the limit

@dataclass(frozen=True)
class BayesLimit:
    """The best accuracy any classifier can reach on the task, and why.

    accuracy / exact: the limit (float / exact fraction); chance: 1/|G|; merged: the blocks of labels that are
    confused (connected components of "some coset is reachable from both"), singletons included; confusion:
    (|G|, |G|) rows = true label, columns = the Bayes decision, as probabilities; reason: one line. Labels are
    positions in the task's list of elements (the group's labels, or the ``labels`` sub-task).
    """

    accuracy: float
    exact: Fraction
    chance: float
    merged: tuple[tuple[int, ...], ...]
    confusion: tuple[tuple[float, ...], ...]
    reason: str


def _components(adjacent: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """Connected components of a symmetric boolean adjacency matrix, each sorted, in order of first member."""
    n = adjacent.shape[0]
    seen = np.zeros(n, dtype=bool)
    blocks = []
    for start in range(n):
        if seen[start]:
            continue
        block, stack = [], [start]
        seen[start] = True
        while stack:
            i = stack.pop()
            block.append(i)
            for j in np.flatnonzero(adjacent[i] & ~seen):
                seen[j] = True
                stack.append(int(j))
        blocks.append(tuple(sorted(block)))
    return tuple(blocks)


def task_elements(
    group: str, grid: int = 2, labels: Sequence[int] | None = None, size: int = unitcell.DEFAULT_SIZE
) -> np.ndarray:
    """Codes of the predicted elements: all of ``group`` in label order, or only ``labels`` of it (a sub-task,
    e.g. ``group="rot4", labels=(0, 1)``: rot0 vs rot90)."""
    codes = group_elements(group, grid, size)
    if labels is None:
        return codes
    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(0 <= g < len(codes) for g in labels):
        raise UserError(f"labels={labels!r}: need at least 2 distinct labels of {group} (0..{len(codes) - 1})")
    return codes[labels]


def label_coset_counts(
    symmetry: np.ndarray, g_codes: np.ndarray, eq_ops: Sequence[str] = (), size: int = unitcell.DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray, int]:
    """L[g, C] = Σ_a counts(a)·1[g·a ∈ C] over the eq-input distribution; returns (L, the left-coset label of
    every element of W, the total count Π|op|). Rows follow ``g_codes``."""
    w = lattice_group(size)
    cosets = w.left_cosets(symmetry)
    counts = eq_input_counts(eq_ops, size)
    support = np.flatnonzero(counts)
    n_cosets = int(cosets.max()) + 1
    table = np.stack(
        [np.bincount(cosets[w.compose(g, support)], weights=counts[support], minlength=n_cosets) for g in g_codes]
    )
    return np.rint(table).astype(np.int64), cosets, int(counts.sum())


def _blocks(merged) -> str:
    return " ".join("{" + ",".join(map(str, b)) + "}" for b in merged)


def limit_from_symmetry(
    symmetry: np.ndarray,
    group: str,
    grid: int = 2,
    eq_ops: Sequence[str] = (),
    size: int = unitcell.DEFAULT_SIZE,
    labels: Sequence[int] | None = None,
    name: str = "the data",
) -> BayesLimit:
    """The Bayes limit for data whose law is invariant under the subgroup ``symmetry`` (codes) of W.

    accuracy = (1/|G|) Σ_C max_g P_a(g·a ∈ C) over the left cosets C of H (module docstring): an upper bound for
    any classifier given only the invariance, attained when the coset can be read off the input.
    """
    w = lattice_group(size)
    g_codes = task_elements(group, grid, labels, size)
    table, _, total = label_coset_counts(symmetry, g_codes, eq_ops, size)
    n_g = table.shape[0]
    exact = Fraction(int(table.max(axis=0).sum()), n_g * total)
    decision = table.argmax(axis=0)  # ties: the first label
    confusion = np.stack([np.bincount(decision, weights=row, minlength=n_g) / total for row in table])
    reach = (table > 0).astype(np.int64)
    merged = _components((reach @ reach.T) > 0)
    if eq_ops:
        base = limit_from_symmetry(symmetry, group, grid, (), size, labels, name).exact
        lowered = f"lower the limit from {float(base):.1%} to {float(exact):.1%}"
        change = "do not change the limit" if base == exact else lowered
        reason = f"eq-input ops [{', '.join(eq_ops)}] before g {change}: labels merge as {_blocks(merged)}"
    else:
        member = np.zeros(w.order, dtype=bool)
        member[np.asarray(symmetry)] = True
        inside = [w.name(int(c)) for c in g_codes[member[g_codes]] if c != 0]
        if len(inside) == n_g - (0 in g_codes):
            reason = f"every predicted element preserves the law of {name}: the task carries no signal"
        elif len(merged) == n_g:
            reason = f"no predicted element but the identity preserves the law of {name}: every label is identifiable"
        else:
            verb = "preserves" if len(inside) == 1 else "preserve"
            reason = (
                f"{', '.join(inside)} {verb} the law of {name}, so g and g·h look alike for h among them: "
                f"labels merge as {_blocks(merged)}"
            )
    return BayesLimit(
        accuracy=float(exact),
        exact=exact,
        chance=1.0 / n_g,
        merged=merged,
        confusion=tuple(tuple(float(v) for v in row) for row in confusion),
        reason=reason,
    )


def bayes_limit(
    kind: str,
    group: str,
    grid: int = 2,
    eq_ops: Sequence[str] = (),
    size: int = unitcell.DEFAULT_SIZE,
    labels: Sequence[int] | None = None,
    **options,
) -> BayesLimit:
    """Best achievable accuracy of predicting g from g·a·x for cells x of a generator (with its options).

    Args:
        kind: "blob", "levelset" or "cylinder"; ``options`` are the generator's (e.g. ``symmetry="pm"``).
        group, grid: the predicted group, as in :mod:`essl.transforms` (rot4, flip4, c4v, translate + grid).
        eq_ops: invariance operations applied to the equivariance input before g, in order (:data:`EQ_OPS`).
        size: pixels per side.
        labels: predict only these labels of the group (uniformly), e.g. (0, 1) = rot0 vs rot90.

    Example: ``bayes_limit("levelset", "rot4", symmetry="pm").accuracy == 0.5`` (rot180 = flipH on pm cells).
    """
    sym = generator_symmetry(kind, size, **options)
    return limit_from_symmetry(sym, group, grid, eq_ops, size, labels, dataset_label(kind, **options))


def equivariance_limit(
    kind: str,
    group: str,
    grid: int = 2,
    eq_ops: Sequence[str] = (),
    size: int = unitcell.DEFAULT_SIZE,
    **options,
) -> BayesLimit:
    """The Bayes limit of an E-SSL run's equivariance accuracy: :func:`bayes_limit` under the name the
    photonics comparison (``essl.eval.phc_compare``) uses, e.g. ``equivariance_limit("levelset", "rot4",
    eq_ops=["shift", "flip4"])``."""
    return bayes_limit(kind, group, grid, eq_ops, size, **options)


# ---------------------------------------------------------------------------------------------- genericity

STAB_RTOL = 1e-9
"""Relative tolerance of the FFT cross-correlation that *proposes* a symmetry; each proposal is verified exactly."""


def stabilisers(cells: np.ndarray) -> np.ndarray:
    """(n, |W|) bool: ``out[i, w]`` iff w·cells[i] == cells[i] exactly (bit for bit).

    For each point operation P the shifts s with roll(P x, s) == x are proposed by an FFT cross-correlation
    (||roll(Px, s) − x||² = 2||x||² − 2 corr(s) ≈ 0, after removing the mean) and each proposal is checked
    exactly, so a nearly symmetric cell never counts as symmetric. Constant cells are invariant under all of W.
    """
    cells = np.asarray(cells)
    n_cells, size = cells.shape[0], cells.shape[-1]
    w = lattice_group(size)
    flat = cells.reshape(n_cells, -1)
    constant = (flat == flat[:, :1]).all(axis=1)
    out = np.zeros((n_cells, w.order), dtype=bool)
    out[constant] = True
    idx = np.flatnonzero(~constant)
    x = cells[idx].astype(np.float64)
    x -= x.mean(axis=(1, 2), keepdims=True)
    norm2 = (x * x).sum(axis=(1, 2))
    spec = np.fft.fft2(x)
    for m in range(N_POINT):
        px = w.act(int(w.code(m)), x)
        corr = np.fft.ifft2(spec * np.conj(np.fft.fft2(px))).real  # corr[s] = <x, roll(Px, s)>
        close = 2 * (norm2[:, None, None] - corr) <= STAB_RTOL * norm2[:, None, None]
        for i, s0, s1 in zip(*np.nonzero(close), strict=True):
            code = int(w.code(m, (s0, s1)))
            out[idx[i], code] = np.array_equal(w.act(code, cells[idx[i]]), cells[idx[i]])
    return out


def _pixel_radii(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat (N²,) distances from the cell centre: of each pixel's centre, nearest point and farthest point."""
    lo = np.arange(size) / size - unitcell.CELL_CENTRE
    hi = lo + 1.0 / size
    near = np.where((lo < 0) & (hi > 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    far = np.maximum(np.abs(lo), np.abs(hi))
    mid = np.abs(lo + 0.5 / size)

    def radius(a):
        return np.hypot(a[:, None], a[None, :]).ravel()

    return radius(mid), radius(near), radius(far)


def support_test(kind: str, cells: np.ndarray, **options) -> np.ndarray:
    """(n,) bool, a *necessary* condition for each map to be a cell the generator can produce.

    levelset: invariant under the plane group's point operations K (every generated cell is, bit for bit).
    blob: one value on the pixels wholly within BLOB_R_CLIP[0] of the centre (always inside), another on the
    pixels wholly beyond BLOB_R_CLIP[1] (always outside). cylinder (supersample 1): the pixels that differ from
    the corner value form a centred disc {ρ ≤ r}, r ≤ MAX_RADIUS (or there are none).
    """
    opts = _kind_options(kind, options)
    cells = np.asarray(cells)
    size = cells.shape[-1]
    flat = cells.reshape(cells.shape[0], -1)
    if _uniform_cells(opts):
        return (flat == flat[:, :1]).all(axis=1)
    if kind == "levelset":
        w = lattice_group(size)
        k = generator_stabiliser(kind, size, **options)
        return np.all([(w.act(int(h), cells) == cells).all(axis=(1, 2)) for h in k], axis=0)
    mid, near, far = _pixel_radii(size)
    if kind == "blob":
        # two-tone maps (supersample 1) are decided at the pixel centres, anti-aliased ones over the whole pixel
        exact = opts["supersample"] == 1
        inner = (mid if exact else far) <= unitcell.BLOB_R_CLIP[0]
        outer = (mid if exact else near) > unitcell.BLOB_R_CLIP[1]
        cout = flat[:, outer]
        ok = (cout == cout[:, :1]).all(axis=1)
        if inner.any():
            cin = flat[:, inner]
            ok &= (cin == cin[:, :1]).all(axis=1) & (cin[:, 0] != cout[:, 0])
        return ok
    if opts["supersample"] != 1:
        raise UserError("support_test for cylinders needs supersample=1 (two-tone maps)")
    corner = flat[:, :1]
    inside = flat != corner
    r = np.where(inside, mid[None, :], 0.0).max(axis=1)  # radius of the disc, if it is one
    disc = mid[None, :] <= r[:, None]
    return (inside == disc).all(axis=1) & (r <= unitcell.MAX_RADIUS)


def relevant_elements(
    symmetry: np.ndarray,
    group: str,
    grid: int = 2,
    eq_ops: Sequence[str] = (),
    size: int = unitcell.DEFAULT_SIZE,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    """Elements u ∉ H whose confusion would cost accuracy, one per double coset HuH (sorted codes).

    Two reachable cosets C, C′ with disjoint sets of best labels must be told apart to reach the limit; an input
    of C could be mistaken for one of C′ only if u·x is on the support for u = w_C′⁻¹ w_C (any representatives:
    the support is H-invariant and x ~ h·x, so only the double coset HuH matters).
    """
    w = lattice_group(size)
    sym = np.asarray(symmetry, dtype=np.int64)
    table, cosets, _ = label_coset_counts(sym, task_elements(group, grid, labels, size), eq_ops, size)
    reached = np.flatnonzero(table.sum(axis=0) > 0)
    best = table[:, reached] == table[:, reached].max(axis=0, keepdims=True)  # (n_g, R)
    _, first = np.unique(cosets, return_index=True)  # the smallest element of each coset
    keys = best.T.astype(np.int64) @ (1 << np.arange(best.shape[0], dtype=np.int64))  # bit mask per coset
    classes = {int(key): first[reached[keys == key]] for key in np.unique(keys)}
    found = [np.zeros(0, dtype=np.int64)]
    for ka, ra in classes.items():
        for kb, rb in classes.items():
            if ka & kb == 0:
                found.append(w.compose(w.inverse(rb)[:, None], ra[None, :]).ravel())
    us = np.unique(np.concatenate(found))
    if us.size == 0:
        return us
    double = cosets[w.compose(sym[None, :], us[:, None])].min(axis=1)  # the double coset, by its smallest coset
    _, pick = np.unique(double, return_index=True)
    return np.sort(us[pick])


@dataclass(frozen=True)
class Genericity:
    """How often the genericity assumption behind :func:`bayes_limit` fails on real samples.

    n: cells checked; extra_symmetry: fraction with a symmetry beyond the built-in K (Stab(x) ⊋ K);
    outside_h: fraction exactly invariant under some element outside H (Stab(x) ⊄ H); ambiguous: fraction for
    which some *relevant* element u ∉ H (:func:`relevant_elements`) maps the cell onto :func:`support_test`.
    The support test is a necessary condition, so ``ambiguous`` over-counts, and the Bayes accuracy lies in
    [limit − ambiguous, limit]. examples: the most frequent extra symmetries, (name, fraction of cells).
    """

    n: int
    extra_symmetry: float
    outside_h: float
    ambiguous: float
    examples: tuple[tuple[str, float], ...]


EXAMPLES_SHOWN = 3
"""How many of the most frequent extra symmetries :func:`genericity` names."""


def genericity_of_cells(
    cells: np.ndarray,
    kind: str,
    group: str,
    grid: int = 2,
    eq_ops: Sequence[str] = (),
    labels: Sequence[int] | None = None,
    **options,
) -> Genericity:
    """:class:`Genericity` of given cells of generator ``kind`` for one task (see :func:`genericity`)."""
    cells = np.asarray(cells)
    size = cells.shape[-1]
    w = lattice_group(size)
    in_k = np.zeros(w.order, dtype=bool)
    in_k[generator_stabiliser(kind, size, **options)] = True
    sym = generator_symmetry(kind, size, **options)
    in_h = np.zeros(w.order, dtype=bool)
    in_h[sym] = True
    stab = stabilisers(cells)
    ambiguous = np.zeros(len(cells), dtype=bool)
    for u in relevant_elements(sym, group, grid, eq_ops, size, labels):
        ambiguous |= support_test(kind, w.act(int(u), cells), **options)
    freq = (stab & ~in_k).mean(axis=0)
    top = np.argsort(-freq, kind="stable")[:EXAMPLES_SHOWN]
    return Genericity(
        n=len(cells),
        extra_symmetry=float((stab & ~in_k).any(axis=1).mean()),
        outside_h=float((stab & ~in_h).any(axis=1).mean()),
        ambiguous=float(ambiguous.mean()),
        examples=tuple((w.name(int(c)), float(freq[c])) for c in top if freq[c] > 0),
    )


GENERICITY_CELLS = 1000
"""Default number of generated cells that :func:`genericity` checks."""


def genericity(
    kind: str,
    group: str,
    grid: int = 2,
    eq_ops: Sequence[str] = (),
    labels: Sequence[int] | None = None,
    *,
    n: int = GENERICITY_CELLS,
    seed: int = 0,
    size: int = unitcell.DEFAULT_SIZE,
    **options,
) -> Genericity:
    """Check the genericity assumption of :func:`bayes_limit` on ``n`` cells of ``generate_cells(kind, ...)``."""
    cells = unitcell.generate_cells(kind, n, seed, size, **options)
    return genericity_of_cells(cells, kind, group, grid, eq_ops, labels, **options)


# ---------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Task:
    """One prediction task: dataset (kind + generator options), predicted group, eq-input operations."""

    note: str
    kind: str
    options: tuple[tuple[str, object], ...] = ()
    group: str = "rot4"
    grid: int = 2
    eq_ops: tuple[str, ...] = ()
    labels: tuple[int, ...] | None = None

    @property
    def dataset(self) -> str:
        return dataset_label(self.kind, **dict(self.options))

    @property
    def task(self) -> str:
        name = f"translate grid {self.grid}" if self.group == "translate" else self.group
        return name if self.labels is None else f"{name} labels {self.labels}"

    def limit(self, size: int = unitcell.DEFAULT_SIZE) -> BayesLimit:
        return bayes_limit(self.kind, self.group, self.grid, self.eq_ops, size, self.labels, **dict(self.options))

    def genericity(self, n: int = GENERICITY_CELLS, seed: int = 0, size: int = unitcell.DEFAULT_SIZE) -> Genericity:
        return genericity(
            self.kind, self.group, self.grid, self.eq_ops, self.labels, n=n, seed=seed, size=size, **dict(self.options)
        )


PM = (("symmetry", "pm"),)

TABLE_TASKS = (
    Task("paper: blob cells, half-cell translation", "blob", group="translate"),
    Task("paper: pm level sets, 4-fold rotation", "levelset", PM),
    Task("pm: rot0 vs rot90 only", "levelset", PM, labels=(0, 1)),
    Task("pm: the blob task on level sets", "levelset", PM, group="translate"),
    Task("p1 level sets", "levelset", (("symmetry", "p1"),)),
    Task("p4m level sets", "levelset", (("symmetry", "p4m"),)),
    Task("p4m: half-cell translations", "levelset", (("symmetry", "p4m"),), group="translate"),
    Task("blob rotation", "blob"),
    Task("old bug: eq input got the view ops", "levelset", PM, eq_ops=("shift", "flip4")),
    Task("old bug on blob translation", "blob", group="translate", eq_ops=("shift", "flip4")),
    Task("essl blob views on the eq input", "blob", group="translate", eq_ops=("c4v",)),
    Task("essl blob invariant-baseline views", "blob", group="translate", eq_ops=("c4v", "halfshift")),
    Task("essl level-set invariant-baseline views", "levelset", PM, eq_ops=("shift", "c4v")),
    Task("reference blob views on the eq input", "blob", group="translate", eq_ops=("flip3", "rot4")),
    Task("reference level-set views on the eq input", "levelset", PM, eq_ops=("shift", "flip3")),
    Task("cylinders (random radius)", "cylinder", group="translate"),
)
"""The tasks of :func:`limits_table`: the paper's two (blob: half-cell translation; pm level set: rot4) and the
informative extras (other plane groups, other groups, invariance operations applied to the equivariance input:
essl's configs and the reference code's, Dangovski et al. 2022, photonics)."""


@dataclass(frozen=True)
class LimitRow:
    task: Task
    limit: BayesLimit
    genericity: Genericity | None = None


def limits_table(
    size: int = unitcell.DEFAULT_SIZE, n_check: int = 0, seed: int = 0, tasks: Sequence[Task] = TABLE_TASKS
) -> list[LimitRow]:
    """The limits of ``tasks`` (default :data:`TABLE_TASKS`), with a genericity check on ``n_check`` generated
    cells per task if ``n_check`` > 0."""
    return [
        LimitRow(t, t.limit(size), t.genericity(n_check, seed, size) if n_check else None) for t in tasks
    ]


def markdown_table(rows: Sequence[LimitRow]) -> str:
    """A Markdown table of :func:`limits_table` rows (with the genericity column if it was checked)."""
    check = any(r.genericity is not None for r in rows)
    head = "| dataset | task | eq-input ops | Bayes limit | chance | merged labels |"
    rule = "|---|---|---|---|---|---|"
    if check:
        head, rule = head + " ambiguous cells |", rule + "---|"
    lines = [head + " note |", rule + "---|"]
    for r in rows:
        t, lim = r.task, r.limit
        ops = ", ".join(t.eq_ops) if t.eq_ops else "none"
        line = f"| {t.dataset} | {t.task} | {ops} | {lim.accuracy:.1%} | {lim.chance:.1%} | {_blocks(lim.merged)} |"
        if check:
            line += f" {r.genericity.ambiguous:.1%} |" if r.genericity is not None else " |"
        lines.append(f"{line} {t.note} |")
    return "\n".join(lines)
