"""The parameter-map contract and composition.

A map rho = M(p), R^m -> R^r, provides

    forward(p)         = M(p)                               (r,)
    jvp(p, dp)         = M'(p) dp                           (r,)
    vjp(p, g)          = M'(p)^T g                          (m,)
    second(p, g, dp)   = sum_i g_i (d2 M_i / dp2) dp        (m,)

For a composition rho = M2(M1(p)) the chain rule gives

    vjp     = M1'^T M2'^T g
    second  = M1''[M2'^T g, dp] + M1'^T M2''[g, M1' dp]
"""

from __future__ import annotations

import numpy as np

from .._validate import as_parameter, check_finite, refuse_complex
from ..errors import PatternError, ShapeError


class ParameterMap:
    """A differentiable map p (length ``n_in``) -> rho (length ``n_out``)."""

    n_in: int
    n_out: int
    #: True when M is affine (second-order term zero)
    affine: bool = False
    #: a counter that changes whenever the map changes in place (a projection's beta): a functional that
    #: caches states by p drops them when it sees another version
    version: int = 0

    def forward(self, p) -> np.ndarray:
        raise NotImplementedError

    def jvp(self, p, dp) -> np.ndarray:
        raise NotImplementedError

    def vjp(self, p, g) -> np.ndarray:
        raise NotImplementedError

    def second(self, p, g, dp) -> np.ndarray:
        if self.affine:
            return np.zeros(self.n_in)
        raise NotImplementedError

    __call__ = forward

    def jvp_block(self, p, dP) -> np.ndarray:
        """(n_out, k): the jvp of each column of the (n_in, k) block dP (this default loops over them)."""
        dP = self.check_block(dP, self.n_in, "dP")
        return np.column_stack([self.jvp(p, dP[:, i]) for i in range(dP.shape[1])])

    def vjp_block(self, p, G) -> np.ndarray:
        """(n_in, k): the vjp of each column of the (n_out, k) block G (this default loops over them)."""
        G = self.check_block(G, self.n_out, "G")
        return np.column_stack([self.vjp(p, np.ascontiguousarray(G[:, i])) for i in range(G.shape[1])])

    @staticmethod
    def check_block(X, n: int, name: str) -> np.ndarray:
        """X as a finite float64 (n, k) array with k >= 1, or a clear error."""
        refuse_complex(X, name)
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != n or X.shape[1] == 0:
            raise ShapeError(f"{name} must be an ({n}, k) block of k >= 1 columns, got shape {X.shape}")
        check_finite(X, name)
        return X


    def check_p(self, p, name="p") -> np.ndarray:
        return as_parameter(p, self.n_in, name)

    def check_out(self, g, name="g") -> np.ndarray:
        g = np.asarray(g, dtype=np.float64)
        if g.shape != (self.n_out,):
            raise ShapeError(f"{name} must have length {self.n_out} (the map's output), got shape {g.shape}")
        return g

    def __repr__(self):
        return f"{type(self).__name__}({self.n_in} -> {self.n_out})"


class IdentityMap(ParameterMap):
    """rho = p."""

    affine = True

    def __init__(self, n: int):
        self.n_in = self.n_out = int(n)

    def forward(self, p):
        return self.check_p(p)

    def jvp(self, p, dp):
        return self.check_p(dp, "dp")

    def vjp(self, p, g):
        return self.check_out(g)

    def jvp_block(self, p, dP):
        return self.check_block(dP, self.n_in, "dP").copy()

    def vjp_block(self, p, G):
        return self.check_block(G, self.n_out, "G").copy()


class Compose(ParameterMap):
    """rho = M_k(...M_2(M_1(p))): maps applied left to right."""

    def __init__(self, maps):
        maps = list(maps)
        if not maps:
            raise ValueError("compose() needs at least one map")
        for a, b in zip(maps, maps[1:]):
            if a.n_out != b.n_in:
                raise PatternError(f"cannot compose {a!r} with {b!r}: {a.n_out} outputs feed {b.n_in} inputs")
        self.maps = maps
        self.n_in, self.n_out = maps[0].n_in, maps[-1].n_out
        self.affine = all(m.affine for m in maps)

    @property
    def version(self) -> int:
        """The sum of the maps' versions: it changes when any of them changes."""
        return sum(int(getattr(m, "version", 0)) for m in self.maps)

    def _inputs(self, p):
        xs = [self.check_p(p)]
        for m in self.maps[:-1]:
            xs.append(m.forward(xs[-1]))
        return xs

    def forward(self, p):
        x = self.check_p(p)
        for m in self.maps:
            x = m.forward(x)
        return x

    def jvp(self, p, dp):
        xs = self._inputs(p)
        d = self.check_p(dp, "dp")
        for m, x in zip(self.maps, xs):
            d = m.jvp(x, d)
        return d

    def vjp(self, p, g):
        xs = self._inputs(p)
        g = self.check_out(g)
        for m, x in zip(reversed(self.maps), reversed(xs)):
            g = m.vjp(x, g)
        return g

    def jvp_block(self, p, dP):
        dP = self.check_block(dP, self.n_in, "dP")
        for m, x in zip(self.maps, self._inputs(p)):
            dP = m.jvp_block(x, dP)
        return dP

    def vjp_block(self, p, G):
        G = self.check_block(G, self.n_out, "G")
        xs = self._inputs(p)
        for m, x in zip(reversed(self.maps), reversed(xs)):
            G = m.vjp_block(x, G)
        return G

    def second(self, p, g, dp):
        # forward sweep: inputs and tangents of every stage
        xs = self._inputs(p)
        ds = [self.check_p(dp, "dp")]
        for m, x in zip(self.maps[:-1], xs[:-1]):
            ds.append(m.jvp(x, ds[-1]))
        # reverse sweep: adjoint g_i and its second-order tangent s_i (both at stage inputs)
        g = self.check_out(g)
        s = np.zeros_like(g)
        for m, x, d in zip(reversed(self.maps), reversed(xs), reversed(ds)):
            s = m.vjp(x, s) + (0.0 if m.affine else m.second(x, g, d))
            g = m.vjp(x, g)
        return s

    def __repr__(self):
        return " -> ".join(map(repr, self.maps))


def compose(*maps) -> ParameterMap:
    """Compose maps applied left to right: ``compose(filter, projection, simp)``."""
    return maps[0] if len(maps) == 1 else Compose(maps)
