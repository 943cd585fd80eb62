"""A literal, slow transcription of the authors' CSPNetFull forward, used to verify :class:`CSPNet`.

It builds edges from a dense block-diagonal (sum n)² matrix and applies the first edge Linear
to the concatenated per-edge input, as the reference implementation does. Same parameters,
same outputs as the fast path up to floating-point rounding; kept for tests and benchmarks.

Example::

    net = CSPNet(CSPNetConfig.small()).double()
    ref = reference_forward(net, t, species, frac, lattice, n_atoms)
"""

from __future__ import annotations

import torch

from crystalign.model.cspnet import CSPNet
from crystalign.model.embeddings import fourier_features, sinusoidal_time_embedding
from crystalign.ops import scatter_mean


def reference_forward(
    net: CSPNet,
    t: torch.Tensor,
    species: torch.Tensor,
    frac: torch.Tensor,
    lattice: torch.Tensor,
    n_atoms: torch.Tensor,
) -> dict[str, torch.Tensor]:
    cfg = net.config
    num_structures = lattice.shape[0]
    node_batch = torch.repeat_interleave(torch.arange(num_structures, device=frac.device), n_atoms)
    dense = torch.block_diag(*[torch.ones(int(n), int(n), device=frac.device) for n in n_atoms])
    edge_index = dense.nonzero().t()  # row-major, as torch_geometric's dense_to_sparse
    frac_diff = (frac[edge_index[1]] - frac[edge_index[0]]) % 1.0
    edge2graph = node_batch[edge_index[0]]

    h = net.node_embedding(species if cfg.dng else species - 1)
    t_emb = sinusoidal_time_embedding(t, cfg.time_dim).repeat_interleave(n_atoms, dim=0)
    h = net.atom_latent_emb(torch.cat([h, t_emb], dim=1))
    for layer in net.layers:
        hn = layer.layer_norm(h)
        hi, hj = hn[edge_index[0]], hn[edge_index[1]]
        ips = (lattice @ lattice.transpose(-1, -2)).view(-1, 9)[edge2graph]
        edge_in = torch.cat([hi, hj, ips, fourier_features(frac_diff, cfg.num_freqs)], dim=1)
        msg = layer.edge_mlp(edge_in)
        agg = scatter_mean(msg, edge_index[0], hn.shape[0])
        h = h + layer.node_mlp(torch.cat([hn, agg], dim=1))
    h = net.final_layer_norm(h)
    pooled = scatter_mean(h, node_batch, num_structures)
    return {
        "pos_b": net.coord_out(h),
        "pos_eta": net.coord_out_2(h),
        "cell_b": torch.einsum("bij,bjk->bik", net.lattice_out(pooled).view(-1, 3, 3), lattice),
        "cell_eta": torch.einsum("bij,bjk->bik", net.lattice_out_2(pooled).view(-1, 3, 3), lattice),
        "species_b": net.type_out(h),
        "species_eta": net.type_out_2(h),
    }
