"""CIF text -> (atomic numbers, fractional coordinates, lattice), fast.

Benchmark CSVs hold thousands of small P1 CIFs written by pymatgen. Parsing each with pymatgen's
``CifParser`` runs at a few hundred rows per second, so simple P1 CIFs take a fast path that
reproduces pymatgen's result (same lattice orientation, same rounding of coordinates near 1/3 and
2/3, same wrapping into [0, 1), same site order; bit-identical on every row of the benchmark
CSVs). Anything unusual (symmetry operations, partial
occupancies, labels that are not plain element symbols, overlapping sites, text fields, magnetic or
oxidation-state data) is handed to pymatgen, so the fast path never changes the meaning of a file.

Example::

    parsed = parse_cif_texts([cif_a, cif_b])
    parsed.numbers[0], parsed.frac[0], parsed.lattice[0], parsed.errors
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

# pymatgen's CifParser defaults, mirrored by the fast path
_FRAC_TOLERANCE = 1e-4
_SITE_TOLERANCE = 1e-4
_IDEAL_FRACS = (1 / 3, 2 / 3)

_TOKEN = re.compile(r"""'[^']*'|"[^"]*"|\S+""")
_CELL_KEYS = (
    "_cell_length_a",
    "_cell_length_b",
    "_cell_length_c",
    "_cell_angle_alpha",
    "_cell_angle_beta",
    "_cell_angle_gamma",
)
_SYMOP_TAGS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz")
# features whose meaning the fast path does not reproduce: pymatgen handles them
_DEFER_PREFIXES = (
    "_atom_site_moment",
    "_space_group_magn",
    "_parent_space_group",
    "_atom_site_cartn",
    "_atom_type_oxidation",
    "_cell_wave_vector",
    "_atom_site_fourier",
)


_DEFER_RE = re.compile("|".join(re.escape(p) for p in _DEFER_PREFIXES), re.IGNORECASE)


class CifProblem(Exception):
    """A CIF that cannot be turned into an ordered crystal; ``reason`` is the user-facing text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Defer(Exception):
    """The fast path does not handle this CIF; pymatgen will."""


@dataclass
class ParsedCifs:
    """Per-text results of :func:`parse_cif_texts`; failed entries are None with a reason in ``errors``."""

    numbers: list[np.ndarray | None]
    frac: list[np.ndarray | None]
    lattice: list[np.ndarray | None]
    errors: dict[int, str] = field(default_factory=dict)
    n_fast: int = 0


@lru_cache(maxsize=1)
def _element_tables() -> tuple[dict[str, int], np.ndarray]:
    """Symbol -> Z, and Z -> rank of pymatgen's default site order (electronegativity, then symbol).

    Elements without an electronegativity get rank -1: pymatgen's order for them depends on
    comparisons with NaN, which the fast path does not imitate.
    """
    from pymatgen.core.periodic_table import Element

    symbols: dict[str, int] = {}
    keyed = []
    for el in Element:
        symbols[el.symbol] = el.Z
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = el.X
        x = float(x) if x is not None else math.nan
        if math.isfinite(x):
            keyed.append(((x, el.symbol), el.Z))
    rank = np.full(max(symbols.values()) + 1, -1, dtype=np.int64)
    for r, (_, z) in enumerate(sorted(keyed)):
        rank[z] = r
    return symbols, rank


def element_number(symbol: str) -> int | None:
    """Atomic number of an element symbol (exact spelling), None when unknown."""
    return _element_tables()[0].get(symbol)


def lattice_from_cif_params(params: np.ndarray) -> np.ndarray:
    """(B,6) a, b, c, alpha, beta, gamma (degrees) -> (B,3,3) cells in pymatgen's orientation.

    ``pymatgen.core.Lattice.from_parameters`` vectorised: c along z, a in the xz plane; CIF readers
    and the CDVAE data pipeline both produce this orientation.
    """
    params = np.asarray(params, dtype=np.float64).reshape(-1, 6)
    a, b, c = params[:, 0], params[:, 1], params[:, 2]
    angles = np.radians(params[:, 3:])
    cos, sin = np.cos(angles), np.sin(angles)
    cos_al, cos_be, cos_ga = cos.T
    sin_al, sin_be, _ = sin.T
    with np.errstate(invalid="ignore", divide="ignore"):
        val = np.clip((cos_al * cos_be - cos_ga) / (sin_al * sin_be), -1, 1)
    gamma_star = np.arccos(val)
    zero = np.zeros_like(a)
    va = np.stack([a * sin_be, zero, a * cos_be], -1)
    vb = np.stack([-b * sin_al * np.cos(gamma_star), b * sin_al * np.sin(gamma_star), b * cos_al], -1)
    vc = np.stack([zero, zero, c], -1)
    return np.stack([va, vb, vc], axis=1)


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return token[1:-1]
    return token


def _parse_simple(text: str) -> tuple[list[int], list[str], list[float]]:
    """Atomic numbers, flat coordinate tokens (x0 y0 z0 x1 ...) and cell parameters of a simple P1 CIF."""
    if _DEFER_RE.search(text):
        raise _Defer
    scalars: dict[str, str] = {}
    loops: list[tuple[list[str], list[str]]] = []
    loop_tags: list[str] | None = None
    loop_vals: list[str] = []
    in_header = False
    seen_data = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        first = line[0]
        if first == "_":
            if in_header:
                if len(line.split(None, 1)) != 1:
                    raise _Defer
                loop_tags.append(line.lower())  # type: ignore[union-attr]
                continue
            loop_tags = None
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise _Defer  # value on the next line or in a text field
            scalars[parts[0].lower()] = parts[1]
            continue
        low = line[:5].lower()
        if low == "loop_" and len(line) == 5:
            loop_tags, loop_vals = [], []
            loops.append((loop_tags, loop_vals))
            in_header = True
            continue
        if low == "data_":
            if seen_data:
                raise _Defer  # several blocks
            seen_data = True
            loop_tags, in_header = None, False
            continue
        if first == ";" or loop_tags is None or "#" in line:  # a trailing comment is not data: pymatgen strips it
            raise _Defer
        in_header = False
        loop_vals.extend(_TOKEN.findall(line))
    if not seen_data:
        raise _Defer
    try:
        params = [float(scalars[k]) for k in _CELL_KEYS]
    except (KeyError, ValueError):
        raise _Defer from None

    symops = atoms = None
    for tags, vals in loops:
        if not tags or len(vals) % len(tags):
            raise _Defer
        for t in _SYMOP_TAGS:
            if t in tags:
                symops = vals[tags.index(t) :: len(tags)]
        if "_atom_site_fract_x" in tags:
            if atoms is not None:
                raise _Defer
            atoms = (tags, vals)
    if not symops or atoms is None:
        raise _Defer
    for op in symops:
        if "".join(_unquote(op).split()).lower() != "x,y,z":
            raise _Defer

    tags, vals = atoms
    ncol = len(tags)
    try:
        i_sym = tags.index("_atom_site_type_symbol")
        i_x, i_y, i_z = (tags.index(f"_atom_site_fract_{c}") for c in "xyz")
    except ValueError:
        raise _Defer from None
    if "_atom_site_label" not in tags:
        raise _Defer  # pymatgen requires labels; let it decide
    table = _element_tables()[0]
    try:
        numbers = [table[_unquote(s)] for s in vals[i_sym::ncol]]
    except KeyError:
        raise _Defer from None
    if not numbers:
        raise _Defer
    if "_atom_site_occupancy" in tags:
        try:
            if any(float(o) != 1.0 for o in vals[tags.index("_atom_site_occupancy") :: ncol]):
                raise _Defer
        except ValueError:
            raise _Defer from None
    coords = [v for xyz in zip(vals[i_x::ncol], vals[i_y::ncol], vals[i_z::ncol]) for v in xyz]
    return numbers, coords, params


def _round_ideal(x: np.ndarray) -> np.ndarray:
    """pymatgen's rounding of coordinates within a relative 1e-4 of 1/3 or 2/3 to those values."""
    x = x.copy()
    for ideal in _IDEAL_FRACS:
        x[np.abs(x / ideal - 1.0) <= _FRAC_TOLERANCE] = ideal
    return x


def _has_overlap(frac_raw: np.ndarray, counts: np.ndarray, max_pairs: int = 1 << 20) -> np.ndarray:
    """Per structure: do two sites coincide within pymatgen's site tolerance (they would be merged)?

    Structures are taken in chunks of about ``max_pairs`` site pairs, so memory stays bounded for
    large cells (sum of n^2 grows quickly with 50-atom structures)."""
    out = np.zeros(counts.size, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pairs = np.cumsum(counts * counts)
    start = 0
    while start < counts.size:
        base = pairs[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(pairs, base + max_pairs, side="right")))
        out[start:stop] = _overlap_chunk(frac_raw, counts[start:stop], offsets[start:stop])
        start = stop
    return out


def _overlap_chunk(frac_raw: np.ndarray, counts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    n_pairs = counts * counts
    struct = np.repeat(np.arange(counts.size), n_pairs)
    local = np.arange(int(n_pairs.sum())) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    n_rep = counts[struct]
    i, j = local // n_rep, local % n_rep
    keep = i < j
    struct, i, j = struct[keep], i[keep], j[keep]
    d = frac_raw[offsets[struct] + j] - frac_raw[offsets[struct] + i]
    d -= np.round(d)
    close = np.all(np.abs(d) < _SITE_TOLERANCE, axis=1)
    out = np.zeros(counts.size, dtype=bool)
    out[struct[close]] = True
    return out


def parse_cif_pymatgen(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse one CIF block with pymatgen; :class:`CifProblem` names what is wrong."""
    from pymatgen.io.cif import CifParser

    parser = None
    with warnings.catch_warnings():
        # pymatgen warns about rounded coordinates, stoichiometry and more: noise for a reader
        warnings.simplefilter("ignore")
        try:
            parser = CifParser.from_str(text)
            structures = parser.parse_structures(primitive=False, on_error="raise")
        except Exception as err:  # pymatgen raises many types for bad text
            detail = "; ".join(w for w in (parser.warnings if parser is not None else []) if "rounded" not in w)
            msg = f"malformed CIF ({type(err).__name__}: {err})" + (f" [{detail}]" if detail else "")
            raise CifProblem(" ".join(msg.split())[:400]) from None
    if len(structures) != 1:
        raise CifProblem(f"malformed CIF: expected one structure, found {len(structures)}")
    return structure_arrays(structures[0])


def structure_arrays(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numbers, frac, lattice) of an ordered pymatgen Structure; :class:`CifProblem` otherwise."""
    from pymatgen.core.periodic_table import Element

    if not structure.is_ordered:
        raise CifProblem(
            f"partial occupancy / disordered sites are not supported (composition {structure.composition})"
        )
    numbers = []
    for site in structure:
        sp = site.specie
        el = getattr(sp, "element", sp)  # Species -> Element; DummySpecies has no element
        if not isinstance(el, Element):
            raise CifProblem(f"unknown element {getattr(sp, 'symbol', str(sp))!r}")
        numbers.append(el.Z)
    return (
        np.asarray(numbers, dtype=np.int64),
        np.asarray(structure.frac_coords, dtype=np.float64).reshape(-1, 3),
        np.asarray(structure.lattice.matrix, dtype=np.float64),
    )


def parse_cif_texts(texts: Sequence[str], fast: bool = True) -> ParsedCifs:
    """Parse many single-block CIF texts; entry ``i`` is None with ``errors[i]`` set when it fails."""
    n = len(texts)
    out = ParsedCifs(numbers=[None] * n, frac=[None] * n, lattice=[None] * n)
    slow: list[int] = []
    fast_idx: list[int] = []
    numbers: list[int] = []
    tokens: list[str] = []
    params: list[list[float]] = []
    counts: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            out.errors[i] = "empty CIF"
            continue
        if not fast:
            slow.append(i)
            continue
        try:
            z, toks, p = _parse_simple(text)
        except _Defer:
            slow.append(i)
            continue
        fast_idx.append(i)
        numbers.extend(z)
        tokens.extend(toks)
        params.append(p)
        counts.append(len(z))

    if fast_idx:
        try:
            raw = np.array(tokens, dtype=np.float64).reshape(-1, 3)
        except ValueError:
            # some coordinate is not a plain number ('?', '0.5(1)'): those rows go to pymatgen
            fast_idx, numbers, tokens, params, counts = _drop_unparsable(fast_idx, numbers, tokens, params, counts, slow)
            raw = np.array(tokens, dtype=np.float64).reshape(-1, 3)
        if fast_idx:
            z_all = np.asarray(numbers, dtype=np.int64)
            cnt = np.asarray(counts, dtype=np.int64)
            raw = _round_ideal(raw)
            overlap = _has_overlap(raw, cnt)
            frac = raw - np.floor(raw)
            lattices = lattice_from_cif_params(np.asarray(params))
            rank = _element_tables()[1][z_all]
            starts = np.concatenate([[0], np.cumsum(cnt)])
            for k, i in enumerate(fast_idx):
                s, e = starts[k], starts[k + 1]
                r = rank[s:e]
                if overlap[k] or (r < 0).any():
                    slow.append(i)
                    continue
                # pymatgen sorts sites by (electronegativity, symbol), stably
                order = np.argsort(r, kind="stable")
                out.numbers[i] = z_all[s:e][order]
                out.frac[i] = frac[s:e][order]
                out.lattice[i] = lattices[k]
                out.n_fast += 1
            slow.sort()

    for i in slow:
        try:
            out.numbers[i], out.frac[i], out.lattice[i] = parse_cif_pymatgen(texts[i])
        except CifProblem as err:
            out.errors[i] = err.reason
    return out


def _drop_unparsable(fast_idx, numbers, tokens, params, counts, slow):
    """Move rows whose coordinates are not plain numbers from the fast lists to ``slow``."""
    keep_idx, keep_z, keep_tok, keep_p, keep_c = [], [], [], [], []
    start = 0
    for i, p, c in zip(fast_idx, params, counts):
        z, tok = numbers[start : start + c], tokens[3 * start : 3 * (start + c)]
        start += c
        try:
            np.array(tok, dtype=np.float64)  # the same parser as the batch conversion
        except ValueError:
            slow.append(i)
            continue
        keep_idx.append(i)
        keep_z.extend(z)
        keep_tok.extend(tok)
        keep_p.append(p)
        keep_c.append(c)
    return keep_idx, keep_z, keep_tok, keep_p, keep_c


def split_cif_blocks(text: str) -> list[tuple[str, str]]:
    """Split a CIF file into (block name, block text) pairs."""
    blocks: list[tuple[str, list[str]]] = []
    header: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped[:5].lower() == "data_":
            blocks.append((stripped[5:].strip(), [line]))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            header.append(line)
    if not blocks:
        return [("", text)]
    return [(name, "".join(lines)) for name, lines in blocks]
