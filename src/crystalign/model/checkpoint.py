"""crystalign model checkpoints: one torch file, loadable with ``weights_only=True``.

Layout::

    {"format": "crystalign-model", "format_version": 1,
     "model_config": {...CSPNetConfig...}, "state_dict": {name: tensor},
     "source": {...} or None, "extra": {...}}

Everything besides tensors is plain Python data (str, int, float, bool, None, lists, dicts), so
loading never unpickles code.

Example::

    save_model_checkpoint("net.pt", net, {"dataset": "perov_5"})
    net, meta = load_model_checkpoint("net.pt")
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from crystalign.config import ConfigError, from_dict
from crystalign.io import save_torch
from crystalign.model.cspnet import CSPNet, CSPNetConfig

FORMAT = "crystalign-model"
FORMAT_VERSION = 1

_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of the wrong kind, too new, or does not fit the model."""


class PickledObjectsError(CheckpointError):
    """The file pickles Python objects (not just tensors and plain data); they are not loaded."""


def _check_plain(value: Any, where: str) -> None:
    # reject objects at save time: they would make the file unloadable with weights_only=True
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint; use plain Python data")


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_model_checkpoint(
    path: str | os.PathLike,
    model: CSPNet,
    extra: dict[str, Any] | None = None,
    *,
    source: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (weights + config) atomically; ``extra``/``source``: plain metadata."""
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    _check_plain(source, "source")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "state_dict": state_dict_cpu(model),
        "source": source,
        "extra": extra,
    }
    save_torch(path, payload)


def _pickles_objects(path: Path) -> bool:
    """True if the file is a torch zip checkpoint that pickles Python classes (not just tensors and plain data)."""
    try:
        return bool(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a torch zip file at all, or an old torch without the helper
        return False


def read_checkpoint_file(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "crystalign checkpoint"
) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file.

    Raises FileNotFoundError (no such file), :class:`PickledObjectsError` (the file pickles Python
    objects, which are never unpickled) or :class:`CheckpointError`: "PATH is not a ``what``: ..." for a file
    that is no torch file at all (empty, text, JSON, another archive), else a folder, or a corrupted or
    truncated torch file.
    """
    path = Path(path)
    if path.is_dir():
        inside = [p.name for p in (path / "model.pt", path / "best.pt", path / "last.ckpt", path / "last.pt") if p.is_file()]
        hint = f"; it holds {', '.join(inside)}" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # torch's legacy reader warns about a "pickle protocol" read from any stray first byte of a non-torch file
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds (KeyError, RuntimeError, ...) for a bad file
        # what torch says about a file that is not its own ("list index out of range", "Unsupported operand 123")
        # only confuses: say what the file is instead
        foreign = not_a_torch_file(path)
        if foreign:
            raise CheckpointError(f"{path} is not a {what}: {foreign}") from None
        text = str(err).strip()
        if "WeightsUnpickler error:" in text:  # keep the reason, drop torch's weights_only=False advice
            text = "unpickler: " + " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        first = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, pickle.UnpicklingError) and _pickles_objects(path):
            raise PickledObjectsError(
                f"{path} holds Python objects besides tensors and plain data, which are not loaded for safety ({first})"
            ) from err
        raise CheckpointError(
            f"{path} is corrupted, truncated or not a torch checkpoint (only tensors and plain data are loaded, "
            f"never pickled code): {first}"
        ) from None


def not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` is plainly no torch file (empty, text, JSON, a zip archive without a pickle), or None when
    it may be one: a zip archive holding ``data.pkl`` or a pickle stream (torch's two formats), possibly damaged."""
    size = 4096
    with open(path, "rb") as fh:
        head = fh.read(size)
    if not head:
        return "the file is empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (torch's current format is one)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # a torch file cut short looks just like this
        return None if any(n.endswith("data.pkl") for n in names) else "it is a zip archive without a torch checkpoint in it"
    if head[0] == 0x80:  # a pickle's PROTO opcode: the legacy torch format
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        # a multi-byte character cut at the end of the first 4096 bytes is still text
        text = head[: err.start].decode("utf-8") if len(head) == size and err.start >= size - 3 else None
    if text is None or "\x00" in text:
        return "it is not a torch checkpoint (unrecognised binary content)"
    stripped = text.strip()
    if not stripped:
        return "it is a text file holding only blank space, not a torch checkpoint"
    if stripped[0] in "{[":
        return "it is a JSON (text) file, not a torch checkpoint"
    line = stripped.splitlines()[0]
    shown = line if len(line) <= 40 else line[:40] + "..."
    return f"it is a text file, not a torch checkpoint (it begins {shown!r})"


def omatg_hint(ckpt: Any, path: str | os.PathLike) -> str:
    """A pointer to ``import-omatg`` when a checkpoint that is not ours holds the authors' network weights."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if isinstance(state, dict) and any(str(k).startswith("model.encoder.") for k in state):
        return f"; it looks like an OMatG Lightning checkpoint: convert it with `crystalign import-omatg {path} --out OUT.pt`"
    return ""


def load_model_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[CSPNet, dict[str, Any]]:
    """The model stored by :func:`save_model_checkpoint` (in eval mode) and its metadata
    (every top-level entry except ``state_dict``)."""
    path = Path(path)
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format: {found!r}){omatg_hint(ckpt, path)}")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer crystalign (format_version {version}, this version reads up to "
            f"{FORMAT_VERSION}); upgrade crystalign to load it"
        )
    try:
        config = from_dict(CSPNetConfig, ckpt.get("model_config"), "model_config")
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model_config: {err}") from err
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: missing state_dict")
    model = CSPNet(config)
    check_state_dict(state, model, what=str(path))
    model.load_state_dict(state)
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta


def check_state_dict(state: dict[str, Any], model: torch.nn.Module, what: str = "state dict") -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and wrongly shaped entries."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = []
    for name in sorted(set(expected) & set(state)):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{name}: not a tensor ({type(value).__name__})")
        elif tuple(value.shape) != expected[name]:
            wrong.append(f"{name}: shape {tuple(value.shape)}, expected {expected[name]}")
        elif not value.is_floating_point():
            wrong.append(f"{name}: dtype {value.dtype}, expected floating point")
    if missing or unexpected or wrong:
        lines = [f"{what} does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            lines.append(f"  mismatched ({len(wrong)}):\n    " + "\n    ".join(wrong))
        raise CheckpointError("\n".join(lines))
