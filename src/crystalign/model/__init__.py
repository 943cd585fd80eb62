"""The CSPNet velocity/denoiser network, its checkpoints, and the import of the authors' weights.

Example::

    from crystalign.model import CSPNet, CSPNetConfig, build_edges
    net = CSPNet(CSPNetConfig.small())
    out = net.forward_batch(0.5, batch, edges=build_edges(batch.n_atoms))   # pos_b, pos_eta, cell_b, cell_eta
"""

from crystalign.model.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_model_checkpoint,
    save_model_checkpoint,
)
from crystalign.model.cspnet import CSPLayer, CSPNet, CSPNetConfig, Edges, build_edges
from crystalign.model.embeddings import SinusoidalTimeEmbedding, fourier_features, sinusoidal_time_embedding
from crystalign.model.omatg_import import import_omatg_checkpoint, load_omatg_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CSPLayer",
    "CSPNet",
    "CSPNetConfig",
    "CheckpointError",
    "Edges",
    "SinusoidalTimeEmbedding",
    "build_edges",
    "fourier_features",
    "import_omatg_checkpoint",
    "load_model_checkpoint",
    "load_omatg_model",
    "save_model_checkpoint",
    "sinusoidal_time_embedding",
]
