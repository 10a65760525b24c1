"""The GEMM screen of the exact searches (:mod:`anomri.scores.search`): f in float32 matrix products.

For f(x, y) = <Phi(x), Psi(y)> + a(x) + b(y), every y attaining min_y f has a
float32 value within twice a rounding-error bound of the running float32
minimum; those survivors are handed on to be recomputed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

__all__ = ["InnerProductForm", "BUILD_ROWS", "EXACT_ROWS", "SCREEN_ELEMENTS"]

#: Reference rows converted to float64 at once while building (bounds the build's memory).
BUILD_ROWS = 1 << 16
#: Reference rows of one exact float64 block of a log-sum-exp.
EXACT_ROWS = 1024
#: Entries of one float32 screening block (|X chunk| x |Y chunk|).
SCREEN_ELEMENTS = 1 << 23


class InnerProductForm:
    """f(x, y) = <Phi(x), Psi(y)> + a(x) + b(y), evaluated in matrix products.

    Two uses: a float32 screen (:meth:`screen`) that lists the candidates of a
    minimum, and exact float64 blocks (:meth:`exact_blocks`) for a log-sum-exp
    over so many points that listing them costs more than evaluating them all.

    Parameters
    ----------
    psi : Tensor
        Psi(Y), shape (M, K), kept in its own dtype: pass float64 unless the values
        are exactly representable in float32, since the exact blocks read it.
    b : Tensor
        b(Y), shape (M,), kept in float64.
    order : ndarray, optional
        Store the rows in this order, e.g. a tree's leaf order
        (``LowerBoundTree.tree.indices``), so that consecutive rows lie close
        together and an exact block far from every query can be skipped whole.

    A subclass may compute Psi block by block instead of storing it, by
    overriding :meth:`psi_rows` and calling ``_set_offsets`` from its constructor.
    """

    def __init__(self, psi: torch.Tensor, b: torch.Tensor, order: np.ndarray | None = None) -> None:
        self.order = order
        rows = slice(None) if order is None else torch.as_tensor(order, device=psi.device)
        self.psi = psi[rows].contiguous()
        self._set_offsets(b[rows], psi.shape[1])

    def _set_offsets(self, b: torch.Tensor, width: int) -> None:
        """Store b (in stored row order) and the norms the float32 error bound needs; Psi is read by psi_rows."""
        self.width = width
        self.b = b.double()
        self.psi_norm_max = max(float(torch.linalg.vector_norm(self.psi_rows(s, s + BUILD_ROWS).double(), dim=1).max())
                                for s in range(0, len(self.b), BUILD_ROWS))
        self.b_abs_max = float(self.b.abs().max())

    def psi_rows(self, start: int, stop: int) -> torch.Tensor:
        """Psi of the stored rows [start, stop), (stop - start, K) in the stored dtype."""
        return self.psi[start:stop]

    def exact_blocks(self, phi: torch.Tensor, a: torch.Tensor, blocks: np.ndarray) -> Iterator[torch.Tensor]:
        """f of the queries against stored rows [EXACT_ROWS k, EXACT_ROWS (k + 1)), k in ``blocks``, float64.

        The float64 products carry a rounding error of order 1e-16 times the
        largest term, the float64 rounding the exact refine has as well.
        """
        phi, a = phi.double(), a.double()
        for k in blocks:
            start, stop = int(k) * EXACT_ROWS, (int(k) + 1) * EXACT_ROWS
            yield torch.addmm(self.b[start:stop], phi, self.psi_rows(start, stop).double().T).add_(a[:, None])

    def error_bound(self, phi: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Bound on |float32 f - f| per query.

        Higham's gamma_K bound on a float32 dot product, with K raised by 8 for the
        rounding of Phi, Psi, a, b to float32 and the two additions, then doubled.
        """
        k = self.width + 8
        unit = 2.0**-24
        gamma = 2.0 * k * unit / (1.0 - k * unit)
        phi_norm = torch.linalg.vector_norm(phi.double(), dim=1)
        return gamma * (phi_norm * self.psi_norm_max + a.double().abs() + self.b_abs_max)

    def screen(self, phi: torch.Tensor, a: torch.Tensor, consume: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Pass ``consume(query rows, reference rows)`` pairs covering every y that attains min_y f.

        Candidates are kept while their float32 value is within twice the error
        bound of the running float32 minimum, and handed over in pieces of at
        most about ``SCREEN_ELEMENTS`` pairs, so memory stays bounded even when
        many points tie within the error bound. A piece may hold pairs that a
        later, lower minimum would have excluded: harmless for a minimum.

        Parameters
        ----------
        phi, a : Tensor
            Phi(x) (Q, K) and a(x) (Q,) of the queries, float64.
        consume : callable
            Receives (query rows, reference rows) index tensors.
        """
        margin = (2.0 * self.error_bound(phi, a)).float()
        phi32, a32, b32 = phi.float(), a.float(), self.b.float()
        running = torch.full((len(phi),), math.inf, device=phi.device)
        rows = max(1, SCREEN_ELEMENTS // max(len(phi), 1))
        kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        n_kept = 0
        # One buffer for every full chunk: reallocating tens of MB per chunk fragments the C heap,
        # which then holds gigabytes.
        buffer = torch.empty(len(phi), rows, device=phi.device)
        mask = torch.empty(len(phi), rows, dtype=torch.bool, device=phi.device)
        for start in range(0, len(self.b), rows):
            psi, b = self.psi_rows(start, start + rows).float(), b32[start : start + rows]
            full = len(psi) == rows
            values = torch.addmm(b, phi32, psi.T, out=buffer) if full else torch.addmm(b, phi32, psi.T)
            values += a32[:, None]
            running = torch.minimum(running, values.min(1).values)
            limit = (running + margin)[:, None]
            below = torch.le(values, limit, out=mask) if full else values <= limit
            q, r = torch.nonzero(below, as_tuple=True)
            refs = r + start if self.order is None else torch.as_tensor(self.order, device=r.device)[r + start]
            kept.append((q, refs, values[q, r]))
            n_kept += len(q)
            if n_kept > SCREEN_ELEMENTS:  # a lower running minimum has ruled many of them out since
                kept = [_below(kept, running + margin)]
                n_kept = len(kept[0][0])
                if n_kept > SCREEN_ELEMENTS // 2:
                    consume(*kept[0][:2])
                    kept, n_kept = [], 0
        if kept:
            consume(*_below(kept, running + margin)[:2])


def _below(kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (query, reference, value) triples whose value is at most the query's limit."""
    q, r, v = (torch.cat(parts) for parts in zip(*kept, strict=True))
    keep = v <= limit[q]
    return q[keep], r[keep], v[keep]
