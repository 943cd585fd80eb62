"""CSPNet (DiffCSP's periodic message-passing network, OMatG's dual-head variant) in plain torch.

One forward returns every head the interpolant needs on the same state: the velocity ``b`` and
the denoiser ``η`` for positions and cell (and species logits for de-novo generation), so an
integration step costs one network call.

Edges are fully connected within each crystal, self-loops included. They depend only on the
atom counts, so build them once with :func:`build_edges` and pass them to every call of an
integration or training step on the same batch layout.

Parameter names equal the authors' (``csp_layer_{i}.edge_mlp.0`` ...), so their weights load
1:1 (see :mod:`crystalign.model.omatg_import`).

Example::

    net = CSPNet(CSPNetConfig.small())
    edges = build_edges(batch.n_atoms)                       # reuse across steps
    out = net.forward_batch(torch.full((len(batch),), 0.5), batch, edges=edges)  # pos_b, pos_eta, cell_b, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crystalign.crystal import MAX_ATOMIC_NUMBER, CrystalBatch
from crystalign.geometry import all_pairs
from crystalign.model.embeddings import SinusoidalTimeEmbedding, fourier_sin_cos
from crystalign.ops import scatter_mean

#: Width of the flattened lattice Gram matrix vec(L Lᵀ) in the edge input.
GRAM_DIM = 9


@dataclass(frozen=True)
class CSPNetConfig:
    """Size of a CSPNet. ``dng``: de-novo generation (species are generated; 101-row embedding,
    index 0 = masked species) instead of crystal structure prediction (species given)."""

    hidden_dim: int = 512
    num_layers: int = 6
    num_freqs: int = 128
    time_dim: int = 256
    dng: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "num_layers", "num_freqs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CSPNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_dim < 4 or self.time_dim % 2:
            raise ValueError(f"CSPNetConfig.time_dim must be even and >= 4, got {self.time_dim}")

    @classmethod
    def paper(cls, dng: bool = False) -> "CSPNetConfig":
        """The published size: 6 layers x 512 (12,403,400 parameters; DNG 12,403,912)."""
        return cls(hidden_dim=512, num_layers=6, num_freqs=128, time_dim=256, dng=dng)

    @classmethod
    def small(cls, dng: bool = False) -> "CSPNetConfig":
        """4 layers x 128: fast enough for CPU experiments."""
        return cls(hidden_dim=128, num_layers=4, num_freqs=128, time_dim=256, dng=dng)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def edge_input_dim(self) -> int:
        """Width of the authors' concatenated edge input [h_i; h_j; vec(L Lᵀ); φ(Δx)]."""
        return 2 * self.hidden_dim + GRAM_DIM + 6 * self.num_freqs

    @property
    def num_embeddings(self) -> int:
        return MAX_ATOMIC_NUMBER + 1 if self.dng else MAX_ATOMIC_NUMBER


@dataclass(frozen=True)
class Edges:
    """Fully connected intra-crystal edges (self-loops included) of one batch layout.

    Edge e has receiver ``src[e]`` = i and sender ``dst[e]`` = j (DiffCSP's ``edge_index[0]``
    and ``[1]``): the message m_ij uses x_j - x_i and is averaged at i. Edges are ordered
    ``[self-loops (N) | pairs i<j as (i, j) (P) | the same pairs as (j, i) (P)]`` so that the
    Fourier part of the first edge Linear is computed once per unordered pair (see
    :class:`CSPLayer`). Depends only on ``n_atoms``: build once, reuse for every step.
    """

    src: torch.Tensor  # (N + 2P,) receiver i
    dst: torch.Tensor  # (N + 2P,) sender j
    pair_i: torch.Tensor  # (P,) unordered pairs within a crystal, pair_i < pair_j
    pair_j: torch.Tensor  # (P,)
    node_batch: torch.Tensor  # (N,) structure index of every atom
    degree: torch.Tensor  # (N,) edges per receiver = atoms in its crystal
    n_atoms: torch.Tensor  # (B,)

    @property
    def num_nodes(self) -> int:
        return int(self.node_batch.shape[0])

    @property
    def num_structures(self) -> int:
        return int(self.n_atoms.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])

    @property
    def num_pairs(self) -> int:
        return int(self.pair_i.shape[0])

    def to(self, device: torch.device | str) -> "Edges":
        return Edges(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def build_edges(n_atoms: torch.Tensor) -> Edges:
    """Edges of a batch with ``n_atoms`` (B,) atoms per structure; cost sum(n_i²), never (sum n_i)²."""
    n_atoms = torch.as_tensor(n_atoms, dtype=torch.long)
    src, dst, _ = all_pairs(n_atoms, include_self=False)
    upper = src < dst
    pair_i, pair_j = src[upper], dst[upper]
    node_batch = torch.repeat_interleave(torch.arange(n_atoms.numel(), device=n_atoms.device), n_atoms)
    nodes = torch.arange(node_batch.numel(), device=n_atoms.device)
    return Edges(
        src=torch.cat([nodes, pair_i, pair_j]),
        dst=torch.cat([nodes, pair_j, pair_i]),
        pair_i=pair_i,
        pair_j=pair_j,
        node_batch=node_batch,
        degree=n_atoms[node_batch],
        n_atoms=n_atoms,
    )


def _silu(x: torch.Tensor) -> torch.Tensor:
    # in place only without autograd: saves one (E, hidden) buffer per layer when sampling
    return F.silu(x, inplace=not torch.is_grad_enabled())


class CSPLayer(nn.Module):
    """One pre-LayerNorm residual message-passing layer (DiffCSP ``CSPLayer``, ``ln=True, ip=True``).

    Computes exactly ``h + MLP_n([h̃_i; mean_j MLP_e([h̃_i; h̃_j; vec(L Lᵀ); φ(x_j - x_i)])])``
    with h̃ = LN(h), but the first edge Linear is split by input block:

    * the h̃_i and h̃_j parts are applied once per atom and gathered, the lattice part once per
      crystal;
    * the Fourier part once per unordered pair {i, j}: φ = [sin | cos] and
      φ(x_i - x_j) = [-sin | cos](x_j - x_i), so W φ for (j, i) is ``W_cos·cos - W_sin·sin``
      given the two products for (i, j); for self-loops φ(0) = [0 | 1] makes it a constant.

    At hidden 512 and ~13 atoms per crystal the per-edge multiply-adds drop from 2313·h (the
    concatenated form) to about 870·h.
    """

    def __init__(self, hidden_dim: int, num_freqs: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_freqs = num_freqs
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * hidden_dim + GRAM_DIM + 6 * num_freqs, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
        )
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
        )
        self.layer_norm = nn.LayerNorm(hidden_dim)

    def forward(
        self, h: torch.Tensor, pair_sin: torch.Tensor, pair_cos: torch.Tensor, gram: torch.Tensor, edges: Edges
    ) -> torch.Tensor:
        """h (N, H); pair_sin, pair_cos (P, 3F): the two halves of φ(x_j - x_i) for the pairs
        i < j of ``edges``; gram (B, 9) vec(L Lᵀ) -> updated h (N, H)."""
        hd, half = self.hidden_dim, 3 * self.num_freqs
        hn = self.layer_norm(h)
        first = self.edge_mlp[0]
        w = first.weight
        # column blocks of the authors' edge input [h_i | h_j | vec(L Lᵀ) | sin φ | cos φ]
        w_i, w_j = w[:, :hd], w[:, hd : 2 * hd]
        w_lat = w[:, 2 * hd : 2 * hd + GRAM_DIM]
        w_sin, w_cos = w[:, 2 * hd + GRAM_DIM : 2 * hd + GRAM_DIM + half], w[:, 2 * hd + GRAM_DIM + half :]

        per_i = F.linear(hn, w_i, first.bias) + F.linear(gram, w_lat).index_select(0, edges.node_batch)
        per_j = F.linear(hn, w_j)
        by_sin = F.linear(pair_sin, w_sin)
        by_cos = F.linear(pair_cos, w_cos)
        self_loop = w_cos.sum(dim=1).expand(edges.num_nodes, hd)
        if torch.is_grad_enabled():
            pre = torch.cat([self_loop, by_cos + by_sin, by_cos - by_sin], dim=0)
        else:  # write the three blocks in place: one (E, hidden) pass fewer
            n, p = edges.num_nodes, edges.num_pairs
            pre = by_cos.new_empty((n + 2 * p, hd))
            pre[:n] = self_loop
            torch.add(by_cos, by_sin, out=pre[n : n + p])
            torch.sub(by_cos, by_sin, out=pre[n + p :])
        pre = pre.add_(per_i.index_select(0, edges.src)).add_(per_j.index_select(0, edges.dst))
        msg = _silu(self.edge_mlp[2](_silu(pre)))
        agg = msg.new_zeros((h.shape[0], hd)).index_add_(0, edges.src, msg)
        agg = agg / edges.degree.to(agg.dtype).unsqueeze(-1)
        return h + self.node_mlp(torch.cat([hn, agg.to(hn.dtype)], dim=-1))


class CSPNet(nn.Module):
    """OMatG's CSPNetFull: time-conditioned periodic GNN with velocity and denoiser heads.

    Output keys (one forward):

    * ``pos_b``, ``pos_eta`` (N, 3): fractional-coordinate velocity and denoiser.
    * ``cell_b``, ``cell_eta`` (B, 3, 3): ``reshape(W mean_i h_i) @ L``, O(3)-equivariant.
    * ``species_b``, ``species_eta`` (N, 100): species logits (DNG models, or on request).

    Inputs are cast to the parameters' dtype; works on any device. Species are atomic numbers
    1..100 (DNG: 0..100, 0 = masked).

    Example::

        net = CSPNet(CSPNetConfig.paper())
        out = net(t, species, frac, lattice, n_atoms)       # dict of tensors
        out["pos_b"].shape                                  # (N, 3)
    """

    def __init__(self, config: CSPNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or CSPNetConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        hd = config.hidden_dim
        self.time_embedding = SinusoidalTimeEmbedding(config.time_dim)  # no parameters
        self.node_embedding = nn.Embedding(config.num_embeddings, hd)
        self.atom_latent_emb = nn.Linear(hd + config.time_dim, hd)
        for i in range(config.num_layers):
            self.add_module(f"csp_layer_{i}", CSPLayer(hd, config.num_freqs))
        self.coord_out = nn.Linear(hd, 3, bias=False)
        self.coord_out_2 = nn.Linear(hd, 3, bias=False)
        self.lattice_out = nn.Linear(hd, 9, bias=False)
        self.lattice_out_2 = nn.Linear(hd, 9, bias=False)
        self.final_layer_norm = nn.LayerNorm(hd)
        # species heads exist in CSP models too, so the authors' checkpoints load unchanged
        self.type_out = nn.Linear(hd, MAX_ATOMIC_NUMBER)
        self.type_out_2 = nn.Linear(hd, MAX_ATOMIC_NUMBER)

    @property
    def layers(self) -> list[CSPLayer]:
        return [getattr(self, f"csp_layer_{i}") for i in range(self.config.num_layers)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        t: torch.Tensor | float,
        species: torch.Tensor,
        frac: torch.Tensor,
        lattice: torch.Tensor,
        n_atoms: torch.Tensor,
        edges: Edges | None = None,
        *,
        species_logits: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """All heads at time ``t`` (B,) (or a scalar) for a flat batch.

        ``species`` (N,) atomic numbers, ``frac`` (N, 3), ``lattice`` (B, 3, 3) with rows as
        lattice vectors, ``n_atoms`` (B,), atoms of a structure contiguous. ``edges``: from
        :func:`build_edges` for the same ``n_atoms`` (built here when omitted).
        ``species_logits`` defaults to ``config.dng``.
        """
        cfg = self.config
        hd = cfg.hidden_dim
        dtype = self.atom_latent_emb.weight.dtype
        device = frac.device
        num_structures, num_nodes = lattice.shape[0], frac.shape[0]
        if edges is None:
            edges = build_edges(torch.as_tensor(n_atoms, device=device))
        elif edges.num_nodes != num_nodes or edges.num_structures != num_structures:
            raise ValueError(
                f"edges were built for {edges.num_structures} structures / {edges.num_nodes} atoms, "
                f"the batch has {num_structures} / {num_nodes}: rebuild them with build_edges(n_atoms)"
            )
        # geometry and phases in at least float32: 2πk·Δx with k up to 127 is meaningless in bf16
        geo = torch.promote_types(dtype, torch.float32)
        t = torch.as_tensor(t, dtype=geo, device=device)
        if t.dim() == 0:
            t = t.expand(num_structures)
        frac = frac.to(geo)
        lattice = lattice.to(geo)

        # h⁰ = Linear([emb(Z); e(t)]): the time half is applied once per crystal, then gathered
        emb = self.node_embedding(species if cfg.dng else species - 1)
        w, b = self.atom_latent_emb.weight, self.atom_latent_emb.bias
        t_emb = self.time_embedding(t).to(dtype)
        h = F.linear(emb, w[:, :hd]) + F.linear(t_emb, w[:, hd:], b).index_select(0, edges.node_batch)

        # shared by all layers: x and L do not change within a forward
        dx = torch.remainder(frac.index_select(0, edges.pair_j) - frac.index_select(0, edges.pair_i), 1.0)
        pair_sin, pair_cos = (f.to(dtype) for f in fourier_sin_cos(dx, cfg.num_freqs))
        gram = (lattice @ lattice.transpose(-1, -2)).reshape(num_structures, 9).to(dtype)
        lattice = lattice.to(dtype)
        for layer in self.layers:
            h = layer(h, pair_sin, pair_cos, gram, edges)
        h = self.final_layer_norm(h)

        pooled = scatter_mean(h, edges.node_batch, num_structures, counts=edges.n_atoms)
        out = {
            "pos_b": self.coord_out(h),
            "pos_eta": self.coord_out_2(h),
            "cell_b": self.lattice_out(pooled).view(num_structures, 3, 3) @ lattice,
            "cell_eta": self.lattice_out_2(pooled).view(num_structures, 3, 3) @ lattice,
        }
        if cfg.dng if species_logits is None else species_logits:
            out["species_b"] = self.type_out(h)
            out["species_eta"] = self.type_out_2(h)
        return out

    def forward_batch(
        self, t: torch.Tensor | float, batch: CrystalBatch, edges: Edges | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` on a :class:`~crystalign.crystal.CrystalBatch`."""
        return self(t, batch.species, batch.frac, batch.lattice, batch.n_atoms, edges, **kwargs)
