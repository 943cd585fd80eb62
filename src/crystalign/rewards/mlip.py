"""Pretrained machine-learned interatomic potentials behind one interface: total energies of ASE Atoms.

Backends never see a structure that failed the shared validity check (the rewards screen first), but they still
return NaN instead of raising for a structure the model cannot handle (CHGNet's isolated atoms, an element the
model was not trained on), so one bad structure never costs the whole batch.

Models load on first use and :func:`get_backend` caches backends per process, so every reward asking for
``"sevenn"`` shares one model.

Example::

    backend = get_backend("sevenn")                    # SevenNet-0, energy-only fast path
    e_total = backend.energies(batch.to_atoms())      # (B,) eV
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}
    if str(dtype) not in table:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return table[str(dtype)]


def _keeps_global_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Building a potential initialises its weights randomly before loading them: leave the caller's torch RNG
    (and so the structures a seeded caller samples next) as it was."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


class MLIPLoadError(RuntimeError):
    """A potential's weights could not be loaded (a named model that must be downloaded, offline)."""


def load_error(kind: str, model: str, err: BaseException) -> MLIPLoadError:
    """A one-line :class:`MLIPLoadError` naming the model (file) and what went wrong deep inside its library."""
    path = Path(model)
    if path.is_dir():
        return MLIPLoadError(f"{kind} model {model} is a folder, not a model file")
    first = (str(err).strip().splitlines() or [""])[0]
    what = "model file" if path.is_file() else "model"
    return MLIPLoadError(f"{kind} {what} {model!r} could not be loaded: {type(err).__name__}: {first}")


#: what evaluating a structure can raise without the model being unusable (out-of-memory is a RuntimeError)
EVALUATION_ERRORS = (ValueError, RuntimeError, IndexError, KeyError)


class ForceField(NamedTuple):
    """One structure's energy (eV), forces ((N, 3) eV/Å) and stress ((6,) Voigt xx yy zz yz xz xy, eV/Å³, ASE's
    sign convention), as an ASE calculator would report them."""

    energy: float
    forces: np.ndarray
    stress: np.ndarray


def evaluate_in_chunks(keys: Sequence[Any], batch_size: int, evaluate: Callable[[list[Any]], Sequence[Any]], name: str) -> list[Any]:
    """``evaluate`` on ``batch_size`` keys at a time, one result per key. A chunk that fails is retried one key at a
    time, so only structures that fail by themselves get their exception as their result: one bad structure, or a
    batch too large for the GPU's memory, never costs the others. Failures are reported in one warning."""
    out: list[Any] = [None] * len(keys)
    errors: list[str] = []
    for start in range(0, len(keys), batch_size):
        rows = list(range(start, min(start + batch_size, len(keys))))
        try:
            for r, value in zip(rows, evaluate([keys[r] for r in rows]), strict=True):
                out[r] = value
            continue
        except EVALUATION_ERRORS as err:
            if len(rows) == 1:
                out[rows[0]] = err
                errors.append(f"{type(err).__name__}: {err}")
                continue
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error the single retries need the memory back
        for r in rows:
            try:
                out[r] = evaluate([keys[r]])[0]
            except EVALUATION_ERRORS as err:
                out[r] = err
                errors.append(f"{type(err).__name__}: {err}")
    if errors:
        warnings.warn(f"{name}: {len(errors)} structure(s) could not be evaluated (NaN), e.g. {errors[0][:300]}", stacklevel=3)
    return out


def energies_in_chunks(keys: Sequence[Any], batch_size: int, evaluate: Callable[[list[Any]], np.ndarray], name: str) -> np.ndarray:
    """:func:`evaluate_in_chunks` for energies: (len(keys),) floats, NaN where a structure could not be evaluated."""
    values = evaluate_in_chunks(keys, batch_size, lambda chunk: list(np.asarray(evaluate(chunk), dtype=float).reshape(-1)), name)
    return np.array([np.nan if isinstance(v, BaseException) else float(v) for v in values], dtype=float)


def _require(module: str, backend: str, dist: str, hint: str = "") -> None:
    """Fail at construction, not at the first reward call, when the backend's package is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"the {backend!r} energy backend needs the {dist!r} package, which is not installed: "
            f"pip install 'crystalign[{backend}]'{hint}"
        )


class MLIPBackend(ABC):
    """Total energies (eV) of periodic structures from one pretrained potential.

    Attributes ``name`` (backend family), ``model`` (weights), ``device`` and ``dtype``. :attr:`identity` is
    what sets the energy scale: (name, model) plus any option that changes it (SevenNet's ``modal``); energies
    with different identities are not comparable (hull files record the identity and refuse another one).
    """

    name: str
    model: str
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def energies(self, atoms_list: Sequence["Atoms"]) -> np.ndarray:
        """(len(atoms_list),) float64 total energies in eV; NaN where the model cannot evaluate a structure."""

    def load(self) -> "MLIPBackend":
        """Load the weights now rather than at the first evaluation, so a missing model fails before any work."""
        return self

    def supported_elements(self) -> set[int] | None:
        """Atomic numbers the model can evaluate (None: unknown, assume all)."""
        return None

    def check_elements(self, species: Sequence[int]) -> None:
        """Raise ValueError naming the elements this potential cannot evaluate."""
        known = self.supported_elements()
        if known is None:
            return
        missing = sorted(set(int(z) for z in species) - known)
        if missing:
            from pymatgen.core import Element

            names = ", ".join(Element.from_Z(z).symbol for z in missing)
            raise ValueError(f"the {self.name} potential ({self.model}) does not support element(s) {names}; choose another backend")

    def ase_calculator(self) -> Any:
        """An ASE calculator with forces and stress (for relaxation) from the same potential."""
        raise NotImplementedError(f"{type(self).__name__} has no ASE calculator")

    #: structures per call of :meth:`energy_forces_stress` (a backend with a batched path raises it)
    relax_batch_size: int = 1

    def energy_forces_stress(self, atoms_list: Sequence["Atoms"]) -> list[ForceField | Exception]:
        """Energy, forces and stress of each structure for relaxation; the exception where the potential failed on it.

        Constraints of the Atoms are ignored (the optimiser applies them). This universal path asks the backend's
        ASE calculator one structure at a time; SevenNet and CHGNet override it with one batched forward of
        :attr:`relax_batch_size` structures.
        """
        calc = self._shared_ase_calculator()

        def evaluate(chunk: list["Atoms"]) -> list[ForceField]:
            out = []
            for atoms in chunk:
                atoms = atoms.copy()
                atoms.set_constraint()
                atoms.calc = calc
                out.append(ForceField(float(atoms.get_potential_energy()), np.array(atoms.get_forces()), np.array(atoms.get_stress())))
            return out

        return evaluate_in_chunks(list(atoms_list), 1, evaluate, f"{self.name} ({self.model})")

    def _shared_ase_calculator(self) -> Any:
        # one calculator per backend: building one reloads the weights
        calc = getattr(self, "_relax_calc", None)
        if calc is None:
            calc = self._relax_calc = self.ase_calculator()
        return calc

    @property
    def identity(self) -> dict[str, str]:
        """What must match for two energies to be comparable: name, model and every option that changes the
        energy scale, as strings. Unset options are left out (so a record without a key means "unset"), and every
        key is a constructor argument of the backend, so ``get_backend(identity)`` rebuilds it."""
        return {"name": self.name, "model": str(self.model)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, device='{self.device}', dtype={self.dtype})"


class ASECalculatorBackend(MLIPBackend):
    """Any ASE calculator, one structure at a time (the slow, universal path).

    ``calculator`` is a calculator or a zero-argument factory (called on first use, so loading stays lazy).
    """

    def __init__(
        self,
        calculator: Any,
        name: str = "ase",
        model: str = "custom",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float64",
    ) -> None:
        self.name, self.model = name, model
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self._calc = None if callable(calculator) and not hasattr(calculator, "get_potential_energy") else calculator
        self._factory = calculator if self._calc is None else None
        self._lock = threading.Lock()

    @property
    def calculator(self) -> Any:
        with self._lock:
            if self._calc is None:
                self._calc = self._factory()  # type: ignore[misc]
        return self._calc

    def ase_calculator(self) -> Any:
        return self.calculator

    def load(self) -> "MLIPBackend":
        self.calculator  # noqa: B018  (the property loads)
        return self

    def energies(self, atoms_list: Sequence["Atoms"]) -> np.ndarray:
        calc = self.calculator
        out = np.full(len(atoms_list), np.nan)
        for i, atoms in enumerate(atoms_list):
            atoms = atoms.copy()
            atoms.calc = calc
            try:
                out[i] = float(atoms.get_potential_energy())
            except (ValueError, RuntimeError, IndexError, KeyError):
                pass  # stays NaN: the reward treats it as invalid
        return out


class SevenNetBackend(MLIPBackend):
    """SevenNet (default ``7net-0``, weights ship in the ``sevenn`` wheel).

    ``mode="fast"`` (default) removes the force/stress module and runs energy-only under no_grad, building each
    graph once (2-4x faster than the ASE calculator on CPU, see bench/mlip.py). ``mode="ase"`` uses ``SevenNetCalculator``
    (float32 only), kept as the reference the fast path is tested against.
    ``batch_size`` graphs go through one forward pass: 1 on CPU (batching does not help there), 32 on CUDA.
    ``modal``: the fidelity of a multi-fidelity model (7net-mf-0: ``"PBE"`` or ``"R2SCAN"``, ~3.5 eV/atom apart),
    required there and part of :attr:`identity` when set; single-fidelity models (7net-0) ignore it.
    """

    def __init__(
        self,
        model: str = "7net-0",
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "float32",
        batch_size: int | None = None,
        mode: str = "fast",
        modal: str | None = None,
    ) -> None:
        _require("sevenn", "sevenn", "sevenn")
        if mode not in ("fast", "ase"):
            raise ValueError(f"mode must be 'fast' or 'ase', got {mode!r}")
        self.name, self.model, self.mode, self.modal = "sevenn", str(model), mode, modal
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        if mode == "ase" and self.dtype != torch.float32:
            raise ValueError("SevenNet's ASE calculator runs in float32 only; use mode='fast' for float64")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 1)
        # forces and stress: a relaxation step of all candidates is one forward (the autograd overhead is per call)
        self.relax_batch_size = 64
        self._net: Any = None
        self._force_net: Any = None
        self._calc: Any = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> dict[str, str]:
        """name, model and, when set, ``modal`` (it selects the energy scale of multi-fidelity models)."""
        ident = super().identity
        if self.modal is not None:
            ident["modal"] = str(self.modal)
        return ident

    # ------------------------------------------------------------------ loading
    @_keeps_global_rng
    def _load(self) -> None:
        with self._lock:
            if self._net is not None or self._calc is not None:
                return
            if self.mode == "ase":
                self._calc = self.ase_calculator()
                return
            self._net = self._build_net(forces=False)

    def _build_net(self, forces: bool) -> Any:
        """The model in eval mode: with forces and stress over batched graphs (``forces=True``: the loaded model
        itself), or energy only (a copy without the force/stress module, the costly autograd part; batched only when
        :attr:`batch_size` > 1). Copying the loaded model costs a fraction of building a second one."""
        import copy

        net = self._loaded_model()
        if forces:
            net.set_is_batch_data(True)
            return net
        net = copy.deepcopy(net)
        net.delete_module_by_key("force_output")
        net.key_grad = None
        net.set_is_batch_data(self.batch_size > 1)
        return net

    @_keeps_global_rng
    def _loaded_model(self) -> Any:
        """The checkpoint's model with its force/stress module, built once (TorchScript compiles e3nn's kernels)."""
        if getattr(self, "_model", None) is not None:
            return self._model
        with warnings.catch_warnings():
            # sevenn/e3nn use torch.jit.script at import and build time, deprecated in recent torch
            warnings.simplefilter("ignore", DeprecationWarning)
            import sevenn._keys as KEY
            import sevenn.atom_graph_data  # noqa: F401  (pulls in torch_geometric)
            from sevenn.util import load_checkpoint

            try:
                cp = load_checkpoint(self.model)
                net = cp.build_model()
            except Exception as err:  # noqa: BLE001 - a damaged file fails deep inside torch.load
                raise load_error("SevenNet", self.model, err) from err
        if net.modal_map:
            if self.modal not in net.modal_map:
                raise ValueError(
                    f"SevenNet model {self.model!r} needs modal= one of {sorted(net.modal_map)} (--modal on the command line), got {self.modal!r} "
                    "(if it came from a hull file, the file predates crystalign recording the modal: rebuild it)"
                )
            net.prepare_modal_deploy(self.modal)
        elif self.modal is not None:  # recorded in hulls and summaries: it must not claim a fidelity it did not use
            raise ValueError(f"modal={self.modal!r} given, but SevenNet model {self.model!r} has no modals; leave --modal out")
        if self.dtype != torch.float32:
            # the one-hot embedding hard-codes float32; cast its output so the rest can run in float64
            dtype = self.dtype

            def _cast(_module, _inputs, data):
                data[KEY.NODE_FEATURE] = data[KEY.NODE_FEATURE].to(dtype)
                return data

            net._modules["onehot_idx_to_onehot"].register_forward_hook(_cast)
        self._cutoff = float(cp.config[KEY.CUTOFF])
        self._known_z = set(int(z) for z in cp.config[KEY.TYPE_MAP])
        self._model = net.to(device=self.device, dtype=self.dtype).eval()
        return self._model

    def load(self) -> "MLIPBackend":
        self._load()
        return self

    def supported_elements(self) -> set[int] | None:
        if self.mode == "ase":
            return None
        self._load()
        return set(self._known_z)

    @_keeps_global_rng
    def ase_calculator(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="No tensor product accelerator")
            from sevenn.calculator import SevenNetCalculator

            try:
                return SevenNetCalculator(self.model, device=self.device, modal=self.modal)
            except Exception as err:  # noqa: BLE001 - a damaged file fails deep inside torch.load
                raise load_error("SevenNet", self.model, err) from err

    def _graph(self, atoms: "Atoms") -> Any:
        import sevenn._keys as KEY
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import _graph_build_f

        src, dst, vec, _ = _graph_build_f(self._cutoff, atoms.pbc, np.asarray(atoms.cell), atoms.positions)
        z = torch.as_tensor(atoms.numbers, dtype=torch.long)
        as_float = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=self.dtype)  # noqa: E731
        return AtomGraphData(
            **{
                KEY.NODE_FEATURE: z,
                KEY.ATOMIC_NUMBERS: z,
                KEY.POS: as_float(atoms.positions),
                KEY.EDGE_IDX: torch.as_tensor(np.stack([src, dst]), dtype=torch.long),
                KEY.EDGE_VEC: as_float(vec),
                KEY.CELL_VOLUME: as_float(abs(atoms.cell.volume)),
                KEY.NUM_ATOMS: torch.tensor(len(atoms)),
                KEY.INFO: {},
            }
        )

    # ------------------------------------------------------------------ evaluation
    def energies(self, atoms_list: Sequence["Atoms"]) -> np.ndarray:
        self._load()
        if self.mode == "ase":
            return ASECalculatorBackend(self._calc, self.name, self.model).energies(atoms_list)
        import sevenn._keys as KEY

        def evaluate(idx: list[int]) -> np.ndarray:
            graphs = [self._graph(atoms_list[i]) for i in idx]
            if self.batch_size == 1:
                data = graphs[0]
            else:
                from torch_geometric.loader.dataloader import Collater

                data = Collater([], follow_batch=None, exclude_keys=None)(graphs)
            with torch.no_grad():
                energy = self._net(data.to(self.device))[KEY.PRED_TOTAL_ENERGY]
            return energy.detach().double().cpu().numpy().reshape(-1)

        out = np.full(len(atoms_list), np.nan)
        todo = [i for i, a in enumerate(atoms_list) if set(a.numbers.tolist()) <= self._known_z]
        out[todo] = energies_in_chunks(todo, self.batch_size, evaluate, f"SevenNet ({self.model})")
        return out


    def energy_forces_stress(self, atoms_list: Sequence["Atoms"]) -> list[ForceField | Exception]:
        """One forward with forces and stress (autograd) over :attr:`relax_batch_size` graphs at a time."""
        if self.mode == "ase":
            return super().energy_forces_stress(atoms_list)
        self._load()
        with self._lock:
            if getattr(self, "_force_net", None) is None:
                self._force_net = self._build_net(forces=True)
        import sevenn._keys as KEY
        from torch_geometric.loader.dataloader import Collater

        def evaluate(chunk: list["Atoms"]) -> list[ForceField]:
            if any(not set(a.numbers.tolist()) <= self._known_z for a in chunk):
                raise ValueError("an element of the structure is not in the model's element table")
            data = Collater([], follow_batch=None, exclude_keys=None)([self._graph(a) for a in chunk]).to(self.device)
            with torch.enable_grad():  # forces are gradients, also when the caller runs under no_grad
                out = self._force_net(data)
            energy = out[KEY.PRED_TOTAL_ENERGY].detach().double().cpu().numpy().reshape(-1)
            forces = out[KEY.PRED_FORCE].detach().double().cpu().numpy()
            # SevenNet's virial order xx yy zz xy yz zx, sign of a pressure; ASE's Voigt order xx yy zz yz xz xy
            stress = -out[KEY.PRED_STRESS].detach().double().cpu().numpy().reshape(len(chunk), 6)[:, [0, 1, 2, 4, 5, 3]]
            ends = np.cumsum([len(a) for a in chunk])
            return [ForceField(float(e), f, st) for e, f, st in zip(energy, np.split(forces, ends[:-1]), stress)]

        return evaluate_in_chunks(list(atoms_list), self.relax_batch_size, evaluate, f"SevenNet ({self.model})")


class CHGNetBackend(MLIPBackend):
    """CHGNet (default ``0.3.0``, weights ship in the ``chgnet`` wheel), batched energy-only prediction.

    CHGNet raises for a structure with an isolated atom (nothing within its 6 Å cutoff), which would fail a whole
    batch: graphs are built one by one and such structures get NaN. float32 only (CHGNet's graphs are float32).
    """

    #: CHGNet's element embedding covers Z = 1..94
    MAX_Z = 94
    #: the models whose weights ship in the chgnet wheel (``CHGNet.load``); anything else must be a file
    NAMED_MODELS = ("0.3.0", "0.2.0", "r2scan")

    def __init__(
        self,
        model: str = "0.3.0",
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 16,
    ) -> None:
        _require("chgnet", "chgnet", "chgnet")
        self.name, self.model, self.batch_size = "chgnet", str(model), int(batch_size)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        if self.dtype != torch.float32:
            raise ValueError("CHGNet runs in float32 only (its graph converter is float32)")
        self._net: Any = None
        self._lock = threading.Lock()

    def supported_elements(self) -> set[int] | None:
        return set(range(1, self.MAX_Z + 1))

    def load(self) -> "MLIPBackend":
        self._load()
        return self

    @_keeps_global_rng
    def ase_calculator(self) -> Any:
        from chgnet.model.dynamics import CHGNetCalculator

        # the calculator would set the shared model's isolated-atom response to "warn", after which an isolated atom
        # gets a finite (meaningless) energy in every later batch instead of NaN: keep it an error
        return CHGNetCalculator(model=self._load(), use_device=str(self.device), on_isolated_atoms="error")

    @_keeps_global_rng
    def _load(self) -> Any:
        with self._lock:
            if self._net is None:
                from chgnet.model import CHGNet

                try:
                    if Path(self.model).is_file():
                        net = CHGNet.from_file(self.model).to(self.device)
                    elif self.model in self.NAMED_MODELS:
                        net = CHGNet.load(model_name=self.model, use_device=str(self.device), verbose=False)
                    else:
                        raise ValueError(f"neither a file nor one of the shipped models {', '.join(self.NAMED_MODELS)}")
                except Exception as err:  # noqa: BLE001 - a damaged file fails deep inside torch.load
                    raise load_error("CHGNet", self.model, err) from err
                self._net = net.eval()
        return self._net

    def energies(self, atoms_list: Sequence["Atoms"]) -> np.ndarray:
        from pymatgen.io.ase import AseAtomsAdaptor

        net = self._load()
        out = np.full(len(atoms_list), np.nan)
        idx, graphs = [], []
        for i, atoms in enumerate(atoms_list):
            if int(atoms.numbers.max(initial=0)) > self.MAX_Z:
                continue
            try:
                graphs.append(net.graph_converter(AseAtomsAdaptor.get_structure(atoms)))
                idx.append(i)
            except (ValueError, RuntimeError, MemoryError):  # an isolated atom; a neighbour search too large to run
                continue
        if graphs:
            with torch.no_grad():
                preds = net.predict_graph(graphs, task="e", batch_size=self.batch_size)
            if isinstance(preds, dict):
                preds = [preds]
            e_per_atom = np.array([float(p["e"]) for p in preds])
            out[idx] = e_per_atom * np.array([len(atoms_list[i]) for i in idx])
        return out


    #: CHGNet predicts a whole batch of graphs per call
    relax_batch_size = 64

    def energy_forces_stress(self, atoms_list: Sequence["Atoms"]) -> list[ForceField | Exception]:
        """CHGNet's batched energy, force and stress prediction, converted as its ASE calculator does."""
        from ase import units
        from pymatgen.io.ase import AseAtomsAdaptor

        net = self._load()

        def evaluate(chunk: list["Atoms"]) -> list[ForceField]:
            if any(int(a.numbers.max(initial=0)) > self.MAX_Z for a in chunk):
                raise ValueError(f"CHGNet covers elements up to Z = {self.MAX_Z}")
            graphs = [net.graph_converter(AseAtomsAdaptor.get_structure(a)) for a in chunk]
            preds = net.predict_graph(graphs, task="efs", batch_size=len(graphs))
            preds = [preds] if isinstance(preds, dict) else preds
            out = []
            for atoms, pred in zip(chunk, preds):
                s3 = np.asarray(pred["s"], dtype=float) * units.GPa
                voigt = np.array([s3[0, 0], s3[1, 1], s3[2, 2], s3[1, 2], s3[0, 2], s3[0, 1]])
                out.append(ForceField(float(pred["e"]) * len(atoms), np.asarray(pred["f"], dtype=float), voigt))
            return out

        return evaluate_in_chunks(list(atoms_list), self.relax_batch_size, evaluate, f"CHGNet ({self.model})")


class MACEBackend(ASECalculatorBackend):
    """MACE (``mace-torch``): a foundation-model name for ``mace_mp`` (e.g. ``medium-mpa-0``, downloads its
    weights) or a path to a local ``.model`` file. float64 by default, as in the paper's reward.

    ``mode="fast"`` (default) runs energy-only forwards (no forces, no stress, no autograd graph) on
    ``batch_size`` graphs at a time: 32 on CUDA, 4 on CPU, where larger batches fall out of cache (bench/mlip.py).
    ``mode="ase"`` is the ASE calculator itself, one structure at a time: the reference the fast path is tested
    against. Both build graphs the calculator's way, so heads, cutoff and element table are the model's.

    mace-torch pins an e3nn that sevenn cannot use: install it in its own environment (``crystalign[mace]``).
    A ``.model`` file is a pickled module, loaded as such by mace: use only files you trust.
    """

    def __init__(
        self,
        model: str | Path = "medium-mpa-0",
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "float64",
        batch_size: int | None = None,
        mode: str = "fast",
    ) -> None:
        _require("mace", "mace", "mace-torch", " in an environment without sevenn (mace-torch pins e3nn==0.4.4)")
        device_, dtype_ = resolve_device(device), resolve_dtype(dtype)
        if mode not in ("fast", "ase"):
            raise ValueError(f"mode must be 'fast' or 'ase', got {mode!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mode = mode
        self.batch_size = batch_size or (32 if device_.type == "cuda" else 4)
        model = str(model)

        def factory() -> Any:
            # mace must be imported before e3nn under recent torch (its e3nn import path patches torch.load)
            from mace.calculators import MACECalculator, mace_mp

            dtype_name = "float64" if dtype_ == torch.float64 else "float32"
            path = Path(model).expanduser()
            if path.is_file():
                try:
                    return MACECalculator(model_paths=str(path), device=str(device_), default_dtype=dtype_name)
                except Exception as err:  # a damaged file or one from an incompatible mace-torch, deep inside torch.load
                    raise load_error("MACE", str(path), err) from err
            if path.suffix == ".model" or len(path.parts) > 1:
                raise FileNotFoundError(f"MACE model file {path} does not exist")
            try:
                return mace_mp(model=model, device=str(device_), default_dtype=dtype_name)
            except Exception as err:  # mace_mp downloads named models; offline that fails deep inside mace
                raise MLIPLoadError(
                    f"MACE model {model!r} could not be loaded ({err}); without network access pass the path of a "
                    "local .model file"
                ) from err

        super().__init__(factory, name="mace", model=model, device=device_, dtype=dtype_)

    def energies(self, atoms_list: Sequence["Atoms"]) -> np.ndarray:
        calc = self.calculator
        if self.mode == "ase" or getattr(calc, "use_compile", False):
            return super().energies(atoms_list)  # compiled models pad each graph: keep the calculator's path
        from mace import data as mace_data
        from mace.tools import torch_geometric, torch_tools

        # the graph construction of MACECalculator._atoms_to_batch (mace-torch 0.3.16), minus its padding
        keyspec = mace_data.KeySpecification(
            info_keys=calc.info_keys, arrays_keys={**calc.arrays_keys, calc.charges_key: "charges"}
        )
        out = np.full(len(atoms_list), np.nan)
        graphs: list[tuple[int, Any]] = []
        with torch_tools.default_dtype(calc.default_dtype):
            for i, atoms in enumerate(atoms_list):
                try:  # an element outside the model's table raises here: that structure alone gets NaN
                    config = mace_data.config_from_atoms(atoms, key_specification=keyspec, head_name=calc.head)
                    graphs.append((i, mace_data.AtomicData.from_config(
                        config, z_table=calc.z_table, cutoff=calc.r_max, heads=calc.available_heads
                    )))
                except (ValueError, RuntimeError, IndexError, KeyError):
                    pass
        def evaluate(chunk: list[Any]) -> np.ndarray:
            batch = torch_geometric.Batch.from_data_list(chunk).to(calc.device)
            per_model = []
            for net in calc.models:  # a committee averages its members, as the calculator does
                dtype = next(net.parameters()).dtype
                data = {k: v.to(dtype) if torch.is_tensor(v) and torch.is_floating_point(v) else v for k, v in batch.to_dict().items()}
                with torch.no_grad():
                    res = net(data, training=False, compute_force=False, compute_virials=False, compute_stress=False)
                per_model.append(res["energy"].detach().double())
            energy = torch.stack(per_model).mean(0) * float(getattr(calc, "energy_units_to_eV", 1.0))
            return energy.cpu().numpy().reshape(-1)

        if graphs:
            out[[i for i, _ in graphs]] = energies_in_chunks([g for _, g in graphs], self.batch_size, evaluate, f"MACE ({self.model})")
        return out


# ---------------------------------------------------------------------------------------------- factory

BACKENDS: dict[str, Callable[..., MLIPBackend]] = {
    "sevenn": SevenNetBackend,
    "chgnet": CHGNetBackend,
    "mace": MACEBackend,
}
_ALIASES = {"7net": "sevenn", "sevennet": "sevenn", "7net-0": "sevenn", "sevennet-0": "sevenn", "mace-mp": "mace"}
_CACHE: dict[tuple, MLIPBackend] = {}
_CACHE_LOCK = threading.Lock()


def get_backend(spec: str | Mapping[str, Any] | MLIPBackend = "sevenn", **options: Any) -> MLIPBackend:
    """A cached backend from a name (``"sevenn"``, ``"chgnet"``, ``"mace"``) or a mapping
    ``{"name": "sevenn", "model": "7net-0", "device": "cuda", "dtype": "float64", ...}``; extra ``options``
    override the mapping. An :class:`MLIPBackend` instance is returned as is.
    """
    if isinstance(spec, MLIPBackend):
        if options:
            raise ValueError("options cannot be applied to an already built backend")
        return spec
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"backend: missing required key 'name' (one of {', '.join(sorted(BACKENDS))})")
        options = {**{k: v for k, v in spec.items() if k != "name"}, **options}
        name = spec["name"]
    elif isinstance(spec, str):
        name = spec
    else:
        raise TypeError(f"backend must be a name, a mapping or an MLIPBackend, got {type(spec).__name__}")
    key_name = _ALIASES.get(str(name).lower(), str(name).lower())
    if key_name not in BACKENDS:
        raise ValueError(f"backend: unknown MLIP backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    options = {k: v for k, v in options.items() if v is not None}
    key = _cache_key(key_name, options)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = BACKENDS[key_name](**options)
        return _CACHE[key]


def _cache_key(name: str, options: Mapping[str, Any]) -> tuple:
    """Options with defaults filled in and device/dtype resolved, so "auto" and "cpu" share one model on CPU."""
    import inspect

    try:
        bound = inspect.signature(BACKENDS[name]).bind(**options)
    except TypeError as err:
        raise ValueError(f"backend {name!r}: {err}") from None
    bound.apply_defaults()
    args = dict(bound.arguments)
    if "device" in args:
        args["device"] = resolve_device(args["device"])
    if "dtype" in args:
        args["dtype"] = resolve_dtype(args["dtype"])
    return (name, tuple(sorted((k, str(v)) for k, v in args.items())))
