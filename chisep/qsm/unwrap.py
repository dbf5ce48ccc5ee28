"""Phase unwrapping: quality-guided (ROMEO-style) and Laplacian, spatial and temporal.

Every spatial method has the signature
``unwrap_<method>(phase, mask=None, *, voxel_size=(1, 1, 1), magnitude=None, ...)``
and returns the unwrapped phase (rad, float32) with the input's shape; voxels
outside the mask are 0. :func:`unwrap` dispatches on ``method``.

* :func:`unwrap_romeo` is exact on noise-free data: inside the mask every voxel
  differs from the true phase by the same multiple of 2 pi (per connected
  component), as long as the true phase changes by less than pi between the
  neighbours that the algorithm chooses to follow.
* :func:`unwrap_laplacian` never fails catastrophically, but it is a
  least-squares fit to the wrapped gradients: where the data are inconsistent
  (noise, phase singularities, true steps above pi) the error is spread as a
  smooth field that is *not* a multiple of 2 pi, and with ``max_iter=0`` (the
  classic one-shot DCT solution on the box) a smooth error also appears
  near the mask border. Use it for fields that are later filtered
  (background removal absorbs much of the error), not where exact phase
  matters.

Multi-echo phase (x, y, z, echo) is unwrapped in space for one template echo
and in time for the others (:func:`unwrap_romeo`); :func:`temporal_unwrap`
repairs 2 pi jumps across echoes of separately unwrapped echoes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

from chisep import validate
from chisep.acquisition import check_echo_times
from chisep.errors import InputError
from chisep.grid import bounding_box
from chisep.physics import wrap_phase
from chisep.registry import Registry

UnwrapMethod = Literal["romeo", "laplacian", "none"]

_TWO_PI = 2.0 * np.pi


# ---------------------------------------------------------------------------
# validation shared by the public functions
# ---------------------------------------------------------------------------
def _check_mask(mask, shape3) -> np.ndarray:
    return validate.as_mask(mask, shape3, default_all=True)


def _check_magnitude(magnitude, shape) -> np.ndarray | None:
    if magnitude is None:
        return None
    return validate.as_magnitude(magnitude, shape=shape[:3], ndims=(len(shape),),
                                 n_echoes=shape[3] if len(shape) == 4 else None)


def _check_echo_times(echo_times, n_echoes: int) -> np.ndarray:
    if echo_times is None:
        raise InputError(
            f"echo_times (s) are required for multi-echo phase ({n_echoes} echoes), got None"
        )
    return check_echo_times(echo_times, n_echoes, data="the phase")


# ---------------------------------------------------------------------------
# ROMEO-style quality-guided unwrapping
# ---------------------------------------------------------------------------
def _axis_slices(axis: int, lo: int, hi: int | None):
    sl = [slice(None)] * 3
    sl[axis] = slice(lo, hi)
    return tuple(sl)


def _wrap_jnp(x):
    return x - _TWO_PI * jnp.round(x / _TWO_PI)


@jax.jit
def _edge_quality_jax(phase, magnitude, phase2, te_ratio):
    """Fused edge weights (one XLA loop per axis instead of ~15 NumPy passes)."""
    out = []
    for axis in range(3):
        n = phase.shape[axis]

        def lo(x):
            return jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)

        def hi(x):
            return jax.lax.slice_in_dim(x, 1, n, axis=axis)

        dphi = _wrap_jnp(hi(phase) - lo(phase))
        second = _wrap_jnp(jnp.diff(dphi, axis=axis))
        pad = [(0, 0)] * 3
        pad[axis] = (1, 1)
        lin = jnp.pad(1.0 - jnp.abs(second) / jnp.pi, pad, constant_values=1.0)
        q = (1.0 - jnp.abs(dphi) / jnp.pi) * lo(lin) * hi(lin)
        if phase2 is not None:
            d2 = _wrap_jnp(hi(phase2) - lo(phase2))
            q = q * jnp.clip(1.0 - jnp.abs(dphi - d2 * te_ratio) / jnp.pi, 0.0, 1.0)
        if magnitude is not None:
            m1, m2 = lo(magnitude), hi(magnitude)
            big = jnp.maximum(m1, m2)
            ratio = jnp.where(big > 0, jnp.minimum(m1, m2) / jnp.where(big > 0, big, 1.0), 0.0)
            q = q * ratio**2
        out.append(jnp.clip(q, 0.0, 1.0))
    return out


def edge_quality(
    phase: np.ndarray,
    magnitude: np.ndarray | None = None,
    *,
    phase2: np.ndarray | None = None,
    te_ratio: float = 1.0,
) -> list[np.ndarray]:
    """ROMEO edge weights between neighbours along x, y and z, each in [0, 1].

    The weight of the edge between voxels i and i+1 (along one axis) is the
    product of (Dymerska et al., MRM 2021):

    * phase coherence ``1 - |wrap(phi[i+1] - phi[i])| / pi`` (small steps are
      trustworthy);
    * phase linearity: ``1 - |wrap(second difference)| / pi`` at both voxels
      (a locally linear phase is smooth, noise is not; 1 on the array border);
    * magnitude coherence ``(min(m_i, m_j) / max(m_i, m_j))^2`` when a
      magnitude is given (noisy or dark voxels have unreliable phase);
    * phase gradient coherence ``1 - |wrap(dphi) - wrap(dphi2) * te_ratio| / pi``
      when a second echo ``phase2`` is given, ``te_ratio = TE / TE2`` (the
      steps of two echoes must agree in direction and size).

    Parameters
    ----------
    phase : (x, y, z) float array, rad (wrapped)
    magnitude : (x, y, z) float array, optional
    phase2 : (x, y, z) float array, rad, optional
        Wrapped phase of another echo.
    te_ratio : float
        Echo time of ``phase`` divided by that of ``phase2``.

    Returns
    -------
    list of three float32 arrays with shapes (x-1, y, z), (x, y-1, z), (x, y, z-1).
    """
    as32 = lambda a: None if a is None else jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    weights = _edge_quality_jax(as32(phase), as32(magnitude), as32(phase2), jnp.float32(te_ratio))
    return [np.asarray(w) for w in weights]


#: Quality bands merged in arbitrary order within the band (best first); edges
#: below the last band are merged in exact quality order (Kruskal).
ROMEO_BANDS = (0.6, 0.4)


def _spanning_parents(n_nodes: int, graph):
    """Orient a spanning forest of ``graph``: parent of every node (virtual root ``n_nodes``).

    The seed of each connected component is arbitrary: integrating along a
    fixed tree gives the same relative phase from any root. Returns
    ``(parent, component_labels)``.
    """
    n_comp, labels = connected_components(graph, directed=False)
    seeds = np.zeros(n_comp, dtype=np.int64)
    np.maximum.at(seeds, labels, np.arange(n_nodes))
    graph = graph.tocoo()
    rows = np.concatenate([graph.row, np.full(n_comp, n_nodes)])
    cols = np.concatenate([graph.col, seeds])
    full = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n_nodes + 1, n_nodes + 1)).tocsr()
    _, parent = breadth_first_order(full, n_nodes, directed=False, return_predecessors=True)
    parent = parent.astype(np.int64)
    parent[n_nodes] = n_nodes
    return parent, labels


def _sum_to_root(parent: np.ndarray, value: np.ndarray, root: int) -> np.ndarray:
    """Sum ``value`` over the path from every node to ``root`` by pointer doubling.

    O(N log depth) vectorised gathers instead of a sequential walk.
    """
    acc = value.copy()
    anc = parent.copy()
    while np.any(anc != root):
        acc = acc + acc[anc]
        anc = anc[anc]
    return acc


def _merge_band(comp, offset, su, sv, pu, pv, q, exact: bool):
    """Merge the components joined by one band of edges.

    ``comp`` labels each node (a run of voxels, see :func:`_spatial_romeo`)
    with its component (compact ids); ``offset`` is the integer 2 pi multiple
    added to each node's voxels so far. Edge i joins nodes ``su[i]`` and
    ``sv[i]`` through voxels whose phase before node offsets is ``pu[i]`` and
    ``pv[i]``. Components are contracted; a spanning forest of the contracted
    graph (maximum quality when ``exact``, else any: breadth-first) fixes the
    2 pi multiple of each component relative to its parent, and the
    multiples are summed to the root. Returns updated ``(comp, offset)``.
    """
    n_comp = int(comp.max()) + 1
    la, lb = comp[su], comp[sv]
    keep = la != lb
    su, sv, pu, pv, q, la, lb = su[keep], sv[keep], pu[keep], pv[keep], q[keep], la[keep], lb[keep]
    if la.size == 0:
        return comp, offset
    if exact:
        # keep the best edge of each pair of components (the sparse matrix
        # would add the costs of parallel edges), then the exact spanning tree
        best = _best_edge_per_pair(la, lb, q, n_comp)
        su, sv, pu, pv, q, la, lb = su[best], sv[best], pu[best], pv[best], q[best], la[best], lb[best]
        graph = coo_matrix((2.0 - q, (la, lb)), shape=(n_comp, n_comp)).tocsr()
        # cost 2 - q is positive, so no edge is mistaken for a missing one
        graph = minimum_spanning_tree(graph)
    else:
        graph = coo_matrix((np.ones(la.size), (la, lb)), shape=(n_comp, n_comp)).tocsr()
    parent, comp_labels = _spanning_parents(n_comp, graph)
    # an edge joins a child to its parent component; pick one per child (in
    # exact mode the pair has a single edge, the tree's)
    a_child = parent[la] == lb
    b_child = parent[lb] == la
    tree_edge = a_child | b_child
    child = np.where(a_child, la, lb)[tree_edge]
    chosen = np.full(n_comp, -1, dtype=np.int64)
    np.maximum.at(chosen, child, np.flatnonzero(tree_edge))
    kids = np.flatnonzero(chosen >= 0)
    edge = chosen[kids]
    value_u = pu[edge] + _TWO_PI * offset[su[edge]]
    value_v = pv[edge] + _TWO_PI * offset[sv[edge]]
    u_in_parent = la[edge] == parent[kids]
    in_parent = np.where(u_in_parent, value_u, value_v)
    in_child = np.where(u_in_parent, value_v, value_u)
    jump = np.zeros(n_comp + 1, dtype=np.int64)
    jump[kids] = np.rint((in_parent - in_child) / _TWO_PI).astype(np.int64)
    total = _sum_to_root(parent, jump, n_comp)[:n_comp]
    return comp_labels[comp], offset + total[comp]


def _best_edge_per_pair(la, lb, q, n_nodes):
    """Indices of the highest-quality edge for each unordered pair of nodes."""
    key = np.minimum(la, lb).astype(np.int64) * n_nodes + np.maximum(la, lb)
    # run edges arrive as three already-sorted blocks (one per axis, C order),
    # which the stable sort (timsort for integers) merges in about linear time
    order = np.argsort(key, kind="stable")
    key_sorted, q_sorted = key[order], q[order]
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    counts = np.diff(np.r_[starts, key_sorted.size])
    group = np.repeat(np.arange(starts.size), counts)
    best_q = np.maximum.reduceat(q_sorted, starts)
    candidates = np.flatnonzero(q_sorted == best_q[group])
    first = candidates[np.r_[True, group[candidates][1:] != group[candidates][:-1]]]
    return order[first]


def _edges_between_runs(shape, flat, run, n_runs, weights):
    """Best-quality edge between each pair of adjacent runs.

    Works on the grid of run ids, axis by axis, so that the millions of
    voxel edges are never gathered into index arrays. Returns run ids
    ``(su, sv)``, compressed voxel indices ``(u, v)`` and qualities ``q``.
    """
    run_grid = np.full(shape, -1, dtype=run.dtype)
    run_grid.ravel()[flat] = run
    run_lo, run_hi, quality, positions = [], [], [], []
    for axis in range(3):
        lo, hi = _axis_slices(axis, None, -1), _axis_slices(axis, 1, None)
        rl, rh = run_grid[lo], run_grid[hi]
        # run ids grow in C order, so rl <= rh for in-mask pairs
        valid = (rl != rh) & (rl >= 0)
        valid &= rh >= 0
        run_lo.append(rl[valid])
        run_hi.append(rh[valid])
        quality.append(weights[axis][valid])
        positions.append((np.flatnonzero(valid), rl.shape, axis))
    la, lb, q = np.concatenate(run_lo), np.concatenate(run_hi), np.concatenate(quality)
    best = _best_edge_per_pair(la, lb, q, n_runs)
    # map the chosen edges back to voxels
    offsets = np.cumsum([0] + [p.size for p, _, _ in positions])
    lower = np.empty(best.size, dtype=np.int64)
    step = np.empty(best.size, dtype=np.int64)
    strides = np.cumprod((1,) + tuple(shape[::-1]))[:3][::-1]  # C-order flat stride per axis
    for (pos, view_shape, axis), a, b in zip(positions, offsets[:-1], offsets[1:]):
        sel = (best >= a) & (best < b)
        # position in the axis's "lower voxel" view -> flat index in the grid
        coords = np.unravel_index(pos[best[sel] - a], view_shape)
        lower[sel] = np.ravel_multi_index(coords, shape)
        step[sel] = strides[axis]
    # compressed voxel index of a grid position (a gather, not a binary search)
    index = np.zeros(int(np.prod(shape)), dtype=np.int64)
    index[flat] = np.arange(flat.size)
    u, v = index[lower], index[lower + step]
    return la[best].astype(np.int64), lb[best].astype(np.int64), u, v, q[best].astype(np.float64)


def _spatial_romeo(phase: np.ndarray, mask: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Unwrap along the maximum-quality spanning forest of the in-mask voxel graph.

    ROMEO grows a region from a seed, always crossing the best remaining edge
    next to the region and unwrapping the new voxel relative to its neighbour:
    Prim's algorithm on the edge qualities, so the unwrapping path is the
    maximum spanning tree. We build that forest Kruskal-style, treating the
    edges of each quality band in ``ROMEO_BANDS`` in any order (as ROMEO
    treats the edges of one of its 256 quantised levels) and the edges below
    the last band in exact order:

    1. runs of voxels along the last axis joined by top-band edges are
       unwrapped by an integer cumulative sum (vectorised) and become nodes;
    2. only the best edge between each pair of runs is kept (the others can
       never enter the spanning tree);
    3. band by band, components are merged through a spanning forest of the
       contracted graph (SciPy's compiled breadth-first search, or its
       minimum spanning tree of ``2 - quality`` for the exact band), and the
       integer 2 pi jumps are summed to the roots by pointer doubling.

    Nothing loops over voxels in Python.
    """
    n = int(mask.sum())
    flat = np.flatnonzero(mask)  # C order: neighbours along the last axis are adjacent
    base = phase.ravel()[flat].astype(np.float64)
    if n == 1:
        out = np.zeros(phase.shape, dtype=np.float32)
        out[mask] = base
        return out
    top = ROMEO_BANDS[0] if ROMEO_BANDS else np.inf
    linked_full = np.zeros(mask.shape, dtype=bool)
    linked_full[:, :, :-1] = mask[:, :, :-1] & mask[:, :, 1:] & (weights[2] >= top)
    link = linked_full.ravel()[flat][:-1]  # voxel k joined to voxel k + 1 (its last-axis neighbour)
    start = np.r_[True, ~link]
    run = np.cumsum(start, dtype=np.int32 if n < 2**31 else np.int64) - 1
    steps = np.zeros(n, dtype=np.int64)
    steps[1:] = np.where(link, np.rint((base[:-1] - base[1:]) / _TWO_PI), 0)
    k = np.cumsum(steps)
    base += _TWO_PI * (k - k[np.flatnonzero(start)][run])
    n_runs = int(run[-1]) + 1

    su, sv, u, v, q = _edges_between_runs(mask.shape, flat, run, n_runs, weights)
    pu, pv = base[u], base[v]
    comp = np.arange(n_runs, dtype=np.int64)
    offset = np.zeros(n_runs, dtype=np.int64)
    for threshold, exact in [(t, False) for t in ROMEO_BANDS] + [(-np.inf, True)]:
        pick = q >= threshold
        if pick.any():
            comp, offset = _merge_band(comp, offset, su[pick], sv[pick], pu[pick], pv[pick], q[pick], exact)
    unwrapped = base + _TWO_PI * offset[run]
    labels = comp[run]
    # ROMEO's "correct global": the 2 pi multiple of a component is arbitrary;
    # pick the one that puts the component's mean phase in [-pi, pi)
    means = np.bincount(labels, weights=unwrapped) / np.bincount(labels)
    unwrapped -= _TWO_PI * np.rint(means / _TWO_PI)[labels]
    out = np.zeros(phase.shape, dtype=np.float32)
    out.ravel()[flat] = unwrapped
    return out


def _mean_quality_in_mask(phase, magnitude, mask):
    weights = _edge_quality_jax(phase, magnitude, None, jnp.float32(1.0))
    total = count = 0.0
    for axis, w in enumerate(weights):
        n = mask.shape[axis]
        both = jax.lax.slice_in_dim(mask, 0, n - 1, axis=axis) & jax.lax.slice_in_dim(mask, 1, n, axis=axis)
        total = total + jnp.sum(jnp.where(both, w, 0.0))
        count = count + jnp.sum(both)
    return total / jnp.maximum(count, 1)


_mean_quality_jit = jax.jit(_mean_quality_in_mask)


def _choose_template(phase, magnitude, mask) -> int:
    """Echo with the best mean edge quality inside the mask.

    Scored on every second voxel along each axis (edges then join voxels two
    apart): an 8x cheaper ranking of the echoes by phase smoothness and SNR.
    """
    sub = (slice(None, None, 2),) * 3
    msk = jnp.asarray(mask[sub])
    scores = [
        float(_mean_quality_jit(
            jnp.asarray(phase[sub + (e,)], dtype=jnp.float32),
            None if magnitude is None else jnp.asarray(magnitude[sub + (e,)], dtype=jnp.float32),
            msk,
        ))
        for e in range(phase.shape[-1])
    ]
    return int(np.argmax(scores))


def _predict_and_snap(wrapped4d, tes, template, u_template, omega, mask):
    """Unwrap every echo to the phase predicted by linear evolution from the template.

    ``omega`` (rad/s) is the unwrapped phase slope; the prediction
    ``U_t + omega * (TE_e - TE_t)`` contains the phase offset implicitly, so
    unlike ROMEO's ``U_t * TE_e / TE_t`` it does not assume a zero offset.
    """
    # on the mask's voxels, echoes contiguous, in float32: the multiple of 2 pi is decided by a margin
    # of pi (0.25 s for a 1 mm head against 0.7 s echo by echo over the grid in float64)
    two_pi = np.float32(_TWO_PI)
    phi = wrapped4d[mask].astype(np.float32, copy=False)
    u_t = np.asarray(u_template, np.float32)[mask]
    pred = u_t[:, None] + np.asarray(omega, np.float32)[mask][:, None] * (tes - tes[template]).astype(np.float32)
    snapped = phi + two_pi * np.rint((pred - phi) / two_pi)
    snapped[:, template] = u_t
    out = np.zeros(wrapped4d.shape, dtype=np.float32)
    out[mask] = snapped
    return out


def _pair_echo(template: int, n_echoes: int) -> int:
    return template + 1 if template + 1 < n_echoes else template - 1


def unwrap_romeo(
    phase,
    mask=None,
    *,
    voxel_size=(1.0, 1.0, 1.0),
    magnitude=None,
    echo_times: Sequence[float] | None = None,
    template_echo: int | None = None,
    individual: bool = False,
) -> np.ndarray:
    """Quality-guided phase unwrapping in the spirit of ROMEO (Dymerska et al. 2021).

    3D phase is unwrapped along the path of best edge quality (see
    :func:`edge_quality`): the maximum spanning tree of the voxel graph, which
    is exactly the order in which ROMEO's region growing visits voxels.

    4D phase (x, y, z, echo) needs ``echo_times``. By default the template echo
    is unwrapped in space, the phase difference between the template and its
    neighbouring echo (the Hermitian product, free of the phase offset) is
    unwrapped in space too, and every echo is then unwrapped in time: each
    voxel takes the 2 pi multiple closest to the linear evolution
    ``U_t + omega * (TE_e - TE_t)``. This tolerates fields far beyond
    ``1 / (2 dTE)`` and, unlike ROMEO's ``U_t * TE_e / TE_t``, does not need the
    phase offset to be removed first. With ``individual=True`` every echo is
    unwrapped in space and only its global 2 pi multiple is set from the
    temporal prediction (use it when echoes are too far apart for temporal
    prediction to be reliable).

    Parameters
    ----------
    phase : (x, y, z) or (x, y, z, echo) float array, rad (wrapped)
    mask : (x, y, z) bool array, optional
        Voxels to unwrap (all when None). Output is 0 outside.
    voxel_size : 3 floats, mm
        Validated for a uniform signature; ROMEO's weights are dimensionless
        and do not depend on it.
    magnitude : array of the phase's shape, optional
        Enables the magnitude-coherence weight (strongly recommended on real data).
    echo_times : sequence of float, s, optional
        Required for 4D phase.
    template_echo : int, optional
        0-based echo unwrapped in space; by default the echo with the best
        mean edge quality inside the mask (usually the first).
    individual : bool
        4D only: unwrap each echo in space (see above).

    Returns
    -------
    unwrapped : float32 array of the phase's shape, rad.
        Inside the mask it differs from the wrapped phase by multiples of 2 pi.
        The global multiple is chosen so that each connected component's mean
        (of the template echo, for 4D) lies in [-pi, pi).

    Raises
    ------
    InputError
        Wrong dimensions, NaN/inf, shape mismatches, empty mask, missing or
        invalid echo times.

    Notes
    -----
    Exactness: if the true phase changes by less than pi along every edge of
    the spanning tree, the result equals the true phase up to one 2 pi
    multiple per connected component of the mask. The tree prefers the
    smoothest edges, so isolated steep edges are bypassed.

    References
    ----------
    Dymerska B, Eckstein K, et al. Phase unwrapping with a rapid opensource
    minimum spanning tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.linspace(0, 20, 16, dtype=np.float32)
    >>> truth = np.broadcast_to(x[:, None, None], (16, 4, 4))
    >>> u = unwrap_romeo(np.angle(np.exp(1j * truth)))
    >>> bool(np.allclose(np.ptp(u - truth), 0, atol=1e-4))
    True
    """
    validate.check_voxel_size(voxel_size)
    phi = validate.as_phase(phase)
    msk = _check_mask(mask, phi.shape[:3])
    mag = _check_magnitude(magnitude, phi.shape)
    tes = None if phi.ndim == 3 else _check_echo_times(echo_times, phi.shape[-1])
    # work in the bounding box of the mask (a brain fills a third of its grid)
    box = bounding_box(msk)
    out = np.zeros(phi.shape, dtype=np.float32)
    out[box] = _romeo_in_box(
        phi[box], msk[box], None if mag is None else mag[box], tes, template_echo, individual
    )
    return out


def _romeo_in_box(phi, msk, mag, tes, template_echo, individual):
    if phi.min() < -np.pi or phi.max() > np.pi:
        phi = wrap_phase(phi)
    phi = np.where(msk if phi.ndim == 3 else msk[..., None], phi, np.float32(0.0)).astype(np.float32, copy=False)
    if phi.ndim == 3:
        return _spatial_romeo(phi, msk, edge_quality(phi, mag))

    n_echoes = phi.shape[-1]
    if n_echoes == 1:
        return _spatial_romeo(phi[..., 0], msk, edge_quality(phi[..., 0], None if mag is None else mag[..., 0]))[..., None]
    if template_echo is None:
        template = _choose_template(phi, mag, msk)
    else:
        template = int(template_echo)
        if not 0 <= template < n_echoes:
            raise InputError(
                f"template_echo must be an echo index 0..{n_echoes - 1} (0-based), got {template_echo}"
            )
    pair = _pair_echo(template, n_echoes)
    mag_t = None if mag is None else mag[..., template]
    mag_p = None if mag is None else mag[..., pair]

    def spatial(e):
        m = None if mag is None else mag[..., e]
        other = _pair_echo(e, n_echoes)
        w = edge_quality(phi[..., e], m, phase2=phi[..., other], te_ratio=tes[e] / tes[other])
        return _spatial_romeo(phi[..., e], msk, w)

    def spatial_difference():
        # Hermitian product of template and pair: 2 pi f (TE_p - TE_t), offset-free
        diff = wrap_phase(phi[..., pair] - phi[..., template]).astype(np.float32)
        mag_d = None if mag is None else np.sqrt(mag_t * mag_p)
        return _spatial_romeo(diff, msk, edge_quality(diff, mag_d))

    # the two unwrappings side by side: their NumPy and JAX passes release the GIL (0.9 -> 0.6 s at 1 mm)
    with ThreadPoolExecutor(max_workers=2) as pool:
        template_job = pool.submit(spatial, template)
        u_d = spatial_difference()
        u_t = template_job.result()
    omega = u_d / (tes[pair] - tes[template])

    if not individual:
        return _predict_and_snap(phi, tes, template, u_t, omega, msk)

    out = np.zeros(phi.shape, dtype=np.float32)
    for e in range(n_echoes):
        u_e = u_t if e == template else spatial(e)
        if e != template:
            pred = u_t + omega * (tes[e] - tes[template])
            k = np.rint(np.median((pred - u_e)[msk]) / _TWO_PI)
            u_e = np.where(msk, u_e + _TWO_PI * k, 0.0)
        out[..., e] = u_e
    return out


def temporal_unwrap(phase, echo_times, mask=None, *, template_echo: int = 0) -> np.ndarray:
    """Remove 2 pi jumps across echoes so that each voxel evolves linearly in time.

    The template echo is kept. The phase slope is taken from the template and
    its neighbouring echo (their difference, corrected by the 2 pi multiple
    that makes its median over the mask smallest), and every other echo is
    moved by the multiple of 2 pi that brings it closest to the linear
    prediction ``U_t + slope * (TE_e - TE_t)``. Use it on echoes that were
    unwrapped in space one by one, whose 2 pi multiples then disagree.

    Parameters
    ----------
    phase : (x, y, z, echo) float array, rad
        Phase of each echo, unwrapped in space (or wrapped: then the slope
        assumes ``|f| * dTE < 0.5`` between template and neighbour).
    echo_times : sequence of float, s
    mask : (x, y, z) bool array, optional
    template_echo : int
        0-based echo kept as is.

    Returns
    -------
    (x, y, z, echo) float32 array, rad (0 outside the mask).
    """
    phi = validate.as_phase(phase)
    if phi.ndim != 4:
        raise InputError(f"temporal_unwrap needs 4D phase (x, y, z, echo), got shape {phi.shape}")
    n_echoes = phi.shape[-1]
    tes = _check_echo_times(echo_times, n_echoes)
    msk = _check_mask(mask, phi.shape[:3])
    if not 0 <= template_echo < n_echoes:
        raise InputError(f"template_echo must be 0..{n_echoes - 1}, got {template_echo}")
    if n_echoes == 1:
        return np.where(msk[..., None], phi, 0.0).astype(np.float32)
    t = int(template_echo)
    pair = _pair_echo(t, n_echoes)
    d = phi[..., pair] - phi[..., t]
    d = d - _TWO_PI * np.rint(np.median(d[msk]) / _TWO_PI)
    omega = d / (tes[pair] - tes[t])
    u_t = np.where(msk, phi[..., t], 0.0)
    return _predict_and_snap(phi, tes, t, u_t, omega, msk)


# ---------------------------------------------------------------------------
# Laplacian unwrapping
# ---------------------------------------------------------------------------
def _masked_divergence(field: np.ndarray, mask: np.ndarray, voxel_size, wrap: bool) -> np.ndarray:
    """div(grad) of ``field`` over in-mask edges only (no flux across the mask border)."""
    div = np.zeros(field.shape, dtype=np.float64)
    for axis in range(3):
        lo, hi = _axis_slices(axis, None, -1), _axis_slices(axis, 1, None)
        step = field[hi] - field[lo]
        if wrap:
            step = wrap_phase(step)
        g = np.where(mask[lo] & mask[hi], step, 0.0) / voxel_size[axis] ** 2
        div[lo] += g
        div[hi] -= g
    return div


def _poisson_dct_solver(shape, voxel_size):
    """Solve lap(u) = r on the box with mirror (Neumann) boundaries via the DCT-II."""
    eig = np.zeros(shape, dtype=np.float64)
    for axis, (n, h) in enumerate(zip(shape, voxel_size)):
        view = [1, 1, 1]
        view[axis] = n
        eig = eig + ((2.0 * np.cos(np.pi * np.arange(n) / n) - 2.0) / h**2).reshape(view)
    eig[0, 0, 0] = 1.0

    def solve(rhs):
        spec = scipy.fft.dctn(rhs, type=2, norm="ortho", workers=-1) / eig
        spec[0, 0, 0] = 0.0
        return scipy.fft.idctn(spec, type=2, norm="ortho", workers=-1)

    return solve


def _laplacian_3d(phase, mask, voxel_size, max_iter: int, tol: float) -> np.ndarray:
    """Least-squares unwrapping inside the mask: PCG on the masked Poisson
    equation, preconditioned by the box DCT solver (Ghiglia and Romero 1994).
    Without a mask (or with ``max_iter=0``) it is the one-shot DCT solution."""
    wrapped = np.where(mask, phase, 0.0).astype(np.float64)
    rhs = _masked_divergence(wrapped, mask, voxel_size, wrap=True)
    solve = _poisson_dct_solver(phase.shape, voxel_size)
    u = solve(rhs)
    if not mask.all() and max_iter > 0:
        # the box solution feels the zero gradients outside the mask; refine with
        # preconditioned conjugate gradients on -lap_mask(u) = -rhs (semi-definite,
        # consistent, so CG converges to a solution in the mask)
        def op(x):
            return np.where(mask, -_masked_divergence(x, mask, voxel_size, wrap=False), 0.0)

        b = np.where(mask, -rhs, 0.0)
        u = np.where(mask, u, 0.0)
        r = b - op(u)
        z = np.where(mask, -solve(r), 0.0)
        p = z.copy()
        rz = float(np.vdot(r, z))
        b_norm = float(np.linalg.norm(b)) or 1.0
        for _ in range(max_iter):
            if np.linalg.norm(r) <= tol * b_norm:
                break
            ap = op(p)
            alpha = rz / float(np.vdot(p, ap))
            u += alpha * p
            r -= alpha * ap
            z = np.where(mask, -solve(r), 0.0)
            rz_new = float(np.vdot(r, z))
            p = z + (rz_new / rz) * p
            rz = rz_new
    # the constant is free: choose the one that best matches the wrapped phase
    const = np.angle(np.sum(np.exp(1j * (wrapped[mask] - u[mask]))))
    return np.where(mask, u + const, 0.0).astype(np.float32)


def unwrap_laplacian(
    phase,
    mask=None,
    *,
    voxel_size=(1.0, 1.0, 1.0),
    magnitude=None,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> np.ndarray:
    """Laplacian (least-squares) phase unwrapping solved with the DCT.

    Computes the Laplacian of the true phase from the wrapped phase and
    inverts it: ``U = lap^-1 div(wrap(grad phi))``. The wrapped finite
    differences are the exact discrete form of Schofield and Zhu's
    ``cos(phi) lap(sin phi) - sin(phi) lap(cos phi)`` (whose discrete version
    sums ``sin`` of the neighbour differences and so underestimates steep
    gradients). The one-shot solution uses mirror (Neumann) boundaries on the
    box, solved by the DCT-II; inside a mask it is then refined by conjugate
    gradients on the masked Poisson equation (no flux across the mask
    border), preconditioned by the same DCT solver (Ghiglia and Romero 1994),
    which makes it exact on consistent data.

    Parameters
    ----------
    phase : (x, y, z) or (x, y, z, echo) float array, rad
        4D input is unwrapped echo by echo.
    mask : (x, y, z) bool array, optional
    voxel_size : 3 floats, mm
        Weights the finite differences (anisotropic voxels).
    magnitude : ignored
        Accepted for a uniform signature.
    max_iter : int
        Conjugate-gradient iterations inside the mask (0: one-shot box solution).
    tol : float
        Stop when the residual norm falls below ``tol`` times the right-hand side's.

    Returns
    -------
    float32 array of the phase's shape, rad; 0 outside the mask.

    Notes
    -----
    The result is *not* congruent with the input. Where the wrapped
    gradients are inconsistent (noise, phase singularities, true steps above
    pi between neighbours) it differs from the true phase by a smooth field,
    not by multiples of 2 pi; the one-shot box solution (``max_iter=0``) is
    also off by a smooth field near the mask border, because the box
    equation sees zero gradients outside the mask. The additive constant is
    chosen to best match the wrapped phase. On consistent data the masked
    solution is exact up to that constant.

    References
    ----------
    Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric
    applications. Opt Lett 2003;28:1194-1196.
    Ghiglia DC, Romero LA. Robust two-dimensional weighted and unweighted phase
    unwrapping that uses fast transforms and iterative methods. JOSA A 1994;11:107.
    """
    vs = validate.check_voxel_size(voxel_size)
    phi = validate.as_phase(phase)
    msk = _check_mask(mask, phi.shape[:3])
    _check_magnitude(magnitude, phi.shape)
    # solve in the bounding box of the mask: the DCTs dominate the cost
    box = bounding_box(msk)
    out = np.zeros(phi.shape, dtype=np.float32)
    if phi.ndim == 3:
        out[box] = _laplacian_3d(phi[box], msk[box], vs, max_iter, tol)
    else:
        for e in range(phi.shape[-1]):
            out[box + (e,)] = _laplacian_3d(phi[box + (e,)], msk[box], vs, max_iter, tol)
    return out


def unwrap(
    phase,
    mask=None,
    *,
    method: UnwrapMethod = "romeo",
    voxel_size=(1.0, 1.0, 1.0),
    magnitude=None,
    echo_times: Sequence[float] | None = None,
) -> np.ndarray:
    """Unwrap 3D or multi-echo phase with the named method.

    Parameters
    ----------
    phase : (x, y, z) or (x, y, z, echo) float array, rad
    mask : (x, y, z) bool array, optional
    method : {"romeo", "laplacian", "none"}
        See :func:`unwrap_romeo` and :func:`unwrap_laplacian`; "none": the phase is
        already unwrapped (e.g. by ROMEO itself) and is returned as it is.
    voxel_size : 3 floats, mm
    magnitude : array of the phase's shape, optional
    echo_times : sequence of float, s
        Needed by "romeo" for 4D phase (temporal unwrapping); "laplacian"
        unwraps each echo separately.

    Returns
    -------
    float32 array of the phase's shape, rad.
    """
    return UNWRAP_METHODS.get(method)(phase, mask, voxel_size=voxel_size, magnitude=magnitude,
                                      echo_times=echo_times)


#: unwrapping methods by name, all called as ``(phase, mask, *, voxel_size, magnitude, echo_times)``
UNWRAP_METHODS = Registry("unwrapping method")
UNWRAP_METHODS.register("romeo", unwrap_romeo)


@UNWRAP_METHODS.register("laplacian")
def _laplacian_echo_by_echo(phase, mask=None, *, voxel_size, magnitude=None, echo_times=None):
    return unwrap_laplacian(phase, mask, voxel_size=voxel_size, magnitude=magnitude)  # no echo times needed


def unwrap_temporal_only(phase, echo_times, mask=None):
    """Each voxel along its echoes only (:func:`temporal_unwrap` on the wrapped phase), no spatial
    unwrapping: with equally spaced echoes the field is right up to whole cycles between echoes
    (k / dTE, which may differ from voxel to voxel). For uses that need no more, e.g. the reliability
    criteria that find the skull (pipeline), whose verdicts do not change under such shifts."""
    phi = validate.as_phase(phase)
    if phi.ndim != 4 or phi.shape[-1] < 2:
        raise InputError(f"temporal unwrapping needs multi-echo phase (x, y, z, echo), got shape {phi.shape}")
    return temporal_unwrap(phi, echo_times, mask)


@UNWRAP_METHODS.register("none")
def already_unwrapped(phase, mask=None, *, voxel_size=None, magnitude=None, echo_times=None):
    """Phase unwrapped elsewhere (ROMEO, a scanner's or another toolbox's unwrapping) passes as it is."""
    return validate.as_phase(phase)


__all__ = [
    "UNWRAP_METHODS",
    "edge_quality",
    "temporal_unwrap",
    "unwrap",
    "unwrap_laplacian",
    "unwrap_romeo",
    "unwrap_temporal_only",
]
