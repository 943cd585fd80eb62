"""Convert the authors' OMatG (Lightning) checkpoints into crystalign model checkpoints.

The authors' parameters live under ``model.encoder.`` in the Lightning ``state_dict`` and carry
the same names as :class:`~crystalign.model.cspnet.CSPNet`'s, so the import is a prefix strip
plus a strict name/shape check. The network size (hidden, layers, frequencies, time dim, CSP or
DNG) is read off the weight shapes.

Files are read with ``weights_only=True``. Lightning checkpoints often also pickle Python objects
(hyper-parameters, callback state); those are replaced by empty placeholders without importing or
running any of their code, and only the weights are kept.

Example::

    meta = import_omatg_checkpoint("omatg_perov.ckpt", "perov_csp.pt")
    net, meta = load_model_checkpoint("perov_csp.pt")
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from crystalign.crystal import MAX_ATOMIC_NUMBER
from crystalign.model.checkpoint import (
    CheckpointError,
    PickledObjectsError,
    check_state_dict,
    read_checkpoint_file,
    save_model_checkpoint,
)
from crystalign.model.cspnet import GRAM_DIM, CSPNet, CSPNetConfig

#: Prefixes of the authors' encoder parameters: Lightning module, then bare OMatG ``Model``.
OMATG_PREFIXES = ("model.encoder.", "encoder.")

_EXTRACT_HINT = (
    "Extract the weights with the authors' code installed, for a file from a source you trust:\n"
    "  python -c \"import torch; ck = torch.load('CKPT', map_location='cpu', weights_only=False); "
    "torch.save(ck['state_dict'], 'weights.pt')\"\n"
    "then run `crystalign import-omatg weights.pt --out OUT.pt`."
)


def _placeholder_type(name: str) -> type:
    # Building one yields an empty OrderedDict: the safe unpickler can then apply any pickled
    # state (attributes or dict items) to it, and no code of the original class ever runs.
    def new(cls: type, *args: Any, **kwargs: Any) -> collections.OrderedDict:
        return collections.OrderedDict()

    return type(f"Skipped[{name}]", (), {"__new__": new, "__module__": __name__})


def _load_skipping_objects(path: Path) -> Any:
    serialization = torch.serialization
    if not hasattr(serialization, "get_unsafe_globals_in_checkpoint") or not hasattr(serialization, "safe_globals"):
        raise CheckpointError(f"{path} holds Python objects besides tensors; this torch cannot skip them.\n{_EXTRACT_HINT}")
    try:
        names = serialization.get_unsafe_globals_in_checkpoint(path)
        with serialization.safe_globals([(_placeholder_type(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure here means: not readable without running its code
        raise CheckpointError(f"cannot read the weights of {path} safely: {str(err).splitlines()[0]}\n{_EXTRACT_HINT}") from err


def read_omatg_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The raw parameter dict of an OMatG checkpoint (Lightning ``.ckpt`` or a bare state dict),
    and plain facts about it (epoch, global step, Lightning version) where present."""
    path = Path(path)
    try:
        ckpt = read_checkpoint_file(path)
    except PickledObjectsError:
        ckpt = _load_skipping_objects(path)
    _refuse_crystalign_checkpoint(ckpt, path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        info = {k: ckpt[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if isinstance(ckpt.get(k), (int, str))}
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        info, state = {}, ckpt
    else:
        raise CheckpointError(f"{path} holds neither a Lightning checkpoint (with 'state_dict') nor a state dict")
    return dict(state), info


def _refuse_crystalign_checkpoint(ckpt: Any, path: Path) -> None:
    """A crystalign generator (or training) checkpoint also holds a CSPNet ``state_dict``, so it would import
    "successfully" with the interpolants and base of --config instead of its own: a silently different model."""
    from crystalign.generator import CHECKPOINT_FORMAT

    if not isinstance(ckpt, dict):
        return
    nested = ckpt.get("generator")
    if ckpt.get("format") == CHECKPOINT_FORMAT or (isinstance(nested, dict) and nested.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"{path} is already a crystalign checkpoint ({CHECKPOINT_FORMAT}), not an OMatG one; use it directly, "
            f"e.g. `crystalign sample --model {path} ...`"
        )


def strip_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Drop the authors' encoder prefix; keys without it are kept as they are (reported later if unknown)."""
    for prefix in OMATG_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}, prefix
    return dict(state), ""


def infer_config(state: dict[str, torch.Tensor]) -> CSPNetConfig:
    """Network size from the (prefix-stripped) weight shapes."""
    try:
        rows, hidden = state["node_embedding.weight"].shape
        time_dim = state["atom_latent_emb.weight"].shape[1] - hidden
        edge_in = state["csp_layer_0.edge_mlp.0.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"cannot infer the network size: missing or malformed {err}") from err
    layers = {int(m.group(1)) for k in state if (m := re.match(r"csp_layer_(\d+)\.", k))}
    num_freqs, rest = divmod(edge_in - 2 * hidden - GRAM_DIM, 6)
    if rows not in (MAX_ATOMIC_NUMBER, MAX_ATOMIC_NUMBER + 1) or rest or num_freqs < 1:
        raise CheckpointError(
            f"weight shapes fit no CSPNet: node_embedding {rows} x {hidden}, edge input width {edge_in}"
        )
    try:
        return CSPNetConfig(
            hidden_dim=int(hidden),
            num_layers=max(layers) + 1,
            num_freqs=int(num_freqs),
            time_dim=int(time_dim),
            dng=rows == MAX_ATOMIC_NUMBER + 1,
        )
    except ValueError as err:
        raise CheckpointError(f"weight shapes fit no CSPNet: {err}") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: the published variants built on score-based-diffusion paths (as named on the authors' model hub)
ONE_SIDED_VARIANTS = ("VPSBD", "VESBD")


def _refuse_one_sided_variant(path: Path) -> None:
    """The VP/VE score-based-diffusion variants were trained with OMatG's one-sided interpolant (a Gaussian base,
    a network that predicts z instead of b), which crystalign does not implement: their weights would load, and
    then sample garbage under any of our configs. Their published folders carry the variant name."""
    resolved = path.resolve()
    named = (resolved.parent.name.lower(), resolved.name.lower())  # e.g. MP-20-CSP/VPSBD-ODE/model.ckpt
    found = [v for v in ONE_SIDED_VARIANTS if any(v.lower() in part for part in named)]
    if found:
        raise CheckpointError(
            f"{path}: the {found[0]} variants use OMatG's one-sided score-based-diffusion interpolant, which crystalign "
            "does not implement; import a Linear, Trig or EncDec variant (e.g. Trig-SDE-Gamma)"
        )


def load_omatg_model(path: str | os.PathLike, expect: CSPNetConfig | None = None) -> tuple[CSPNet, dict[str, Any]]:
    """A :class:`CSPNet` holding the authors' weights, and a ``source`` record describing the file.

    ``expect``: the size the file must have (e.g. ``CSPNetConfig.paper()``); default: inferred.
    """
    path = Path(path)
    _refuse_one_sided_variant(path)
    raw, info = read_omatg_state_dict(path)
    state, prefix = strip_prefix(raw)
    config = expect if expect is not None else infer_config(state)
    model = CSPNet(config)
    check_state_dict(state, model, what=f"{path} (prefix {prefix or 'none'!r} stripped)")
    model.load_state_dict(state)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {', '.join(bad)}")
    source = {
        "kind": "omatg",
        "file": path.name,
        "sha256": _sha256(path),
        "prefix": prefix,
        "num_parameters": model.num_parameters(),
        **info,
    }
    return model.eval(), source


def import_omatg_checkpoint(
    path: str | os.PathLike, out: str | os.PathLike, expect: CSPNetConfig | None = None
) -> dict[str, Any]:
    """Convert an OMatG checkpoint into a crystalign model checkpoint at ``out`` (atomic write).

    Returns the metadata written (format, config, source)."""
    model, source = load_omatg_model(path, expect)
    save_model_checkpoint(out, model, source=source)
    return {"model_config": model.config.to_dict(), "source": source}
