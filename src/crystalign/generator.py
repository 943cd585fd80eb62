"""The base generative model as one object: network + interpolants + base distribution + sampler defaults.

This is what a checkpoint holds and what sampling, RL and ``predict`` load.

Example::

    gen = Generator.load("perov_5")                     # shipped model name or checkpoint path
    structures = gen.sample_compositions(["SrTiO3"], n=8, steps=50, seed=0)
"""

from __future__ import annotations

import hashlib
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from crystalign.config import from_dict, to_dict
from crystalign.crystal import MAX_ATOMIC_NUMBER, CrystalBatch
from crystalign.distributions import BaseDistribution
from crystalign.interpolants import Interpolants
from crystalign.model.checkpoint import omatg_hint, read_checkpoint_file
from crystalign.model.cspnet import CSPNet, CSPNetConfig
from crystalign.sampling import Sampler, SamplerConfig

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Composition

    from crystalign.schedule import VelocitySchedule


CHECKPOINT_FORMAT = "crystalign-generator"
CHECKPOINT_VERSION = 1


@dataclass
class BaseConfig:
    """Lattice log-normal parameters: a preset name (e.g. ``perov_5``) or ``fit`` (from the training data)."""

    lattice: str = "fit"
    mu: list[float] | None = None
    s: list[float] | None = None


@dataclass
class GeneratorConfig:
    net: CSPNetConfig = field(default_factory=CSPNetConfig.small)
    interpolants: dict[str, Any] = field(
        default_factory=lambda: {"pos": {"path": "linear", "periodic": True, "correct_com": True}, "cell": {"path": "linear"}}
    )
    base: BaseConfig = field(default_factory=BaseConfig)
    sampling: SamplerConfig = field(default_factory=SamplerConfig)
    max_atoms: int = 64


class Generator(torch.nn.Module):
    """Network + interpolants + base distribution, saved and loaded together."""

    def __init__(self, config: GeneratorConfig, base: BaseDistribution, coverage: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.net = CSPNet(config.net)
        self.interpolants = Interpolants.from_config(config.interpolants)
        if config.net.dng != (self.interpolants.species is not None):
            raise ValueError(
                "generator.net.dng and generator.interpolants.species must agree: a de novo (DNG) model needs both "
                "`net: {dng: true}` and a species flow (`interpolants: {species: {kind: mask, noise: ...}}`), a CSP "
                "model neither"
            )
        self.base = base
        #: training coverage: elements and atom counts seen (for out-of-coverage warnings)
        self.coverage = coverage or {}
        #: learned velocity-annealing schedule used by default when sampling (None: plain integration)
        self.schedule: VelocitySchedule | None = None
        #: an RL-tuned model: {"fields": reinforced fields, "model": its base model, "hash": the base's hash};
        #: ``net`` is then a FieldSplitNet of the base network and the tuned one (None: a base model)
        self.tuned_from: dict[str, Any] | None = None
        self._freeze_unused_heads()

    def _freeze_unused_heads(self) -> None:
        """Heads no loss trains (η of ODE fields, species logits in CSP) get no gradients.

        Besides saving optimiser state, DDP requires every trainable parameter to receive a gradient;
        otherwise its buckets are not all-reduced and ranks drift apart.
        """
        # species have no denoiser: only a DNG model's logits head (type_out) is trained
        unused = [self.net.type_out_2] if self.net.config.dng else [self.net.type_out, self.net.type_out_2]
        if not self.interpolants["pos"].uses_denoiser:
            unused.append(self.net.coord_out_2)
        if not self.interpolants["cell"].uses_denoiser:
            unused.append(self.net.lattice_out_2)
        for module in unused:
            module.requires_grad_(False)

    @property
    def is_dng(self) -> bool:
        """Whether this is a de novo model: it generates the species too (else species are given: CSP)."""
        return self.interpolants.species is not None

    def check_csp(self, what: str = "this command") -> None:
        """ValueError unless this is a CSP model (``what`` needs compositions to be given)."""
        if self.is_dng:
            raise ValueError(
                f"{what} needs a crystal structure prediction (CSP) model, which is given compositions; this is a de "
                "novo (DNG) model: generate new crystals with `crystalign generate` (Python: Generator.generate)"
            )

    # ------------------------------------------------------------------ sampling
    def base_sample(self, species: torch.Tensor, n_atoms: torch.Tensor, generator: torch.Generator | None = None) -> CrystalBatch:
        p = next(self.net.parameters())
        return self.base.sample(species.to(p.device), n_atoms.to(p.device), generator=generator, dtype=p.dtype, device=p.device)

    def sampler(
        self, schedule: "VelocitySchedule | str | Path | bool | None" = None, elements: "str | Sequence[str] | None" = None,
        **overrides,
    ) -> Sampler:
        """A sampler with this model's defaults, ``overrides`` (None = default) and velocity schedule.

        ``elements`` (DNG models): the elements new crystals may contain — ``None`` = those of the training
        crystals (the default: an element the model never saw has an untrained logit), ``"all"`` = any of the
        100, or a list of symbols (a chemical space to search, e.g. ``["Sr", "Ba", "Ti", "O", "N"]``).

        ``schedule``: None or True = the model's own (if it carries one), False = none, a path = the s(t) of a
        velocity-annealing RL checkpoint (learned for this model), or a :class:`VelocitySchedule`. With a
        schedule, the default step count is the one it was learned for.
        """
        sched = self.resolve_schedule(schedule)
        cfg = to_dict(self.config.sampling)
        if sched is not None:
            cfg["steps"] = sched.steps
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        allowed = self.element_mask(elements) if self.is_dng else None
        return Sampler(self.net, self.interpolants, SamplerConfig(**cfg), schedule=sched, elements=allowed)

    def element_mask(self, elements: "str | Sequence[str] | None" = None) -> torch.Tensor | None:
        """(100,) bool mask (index Z - 1) of the elements a DNG model may generate; see :meth:`sampler`."""
        from pymatgen.core.periodic_table import Element

        if isinstance(elements, str) and elements == "all":
            return None
        if elements is None:
            elements = (self.coverage or {}).get("elements")
            if not elements:  # no record of the training elements (e.g. imported weights): any element
                return None
        elif isinstance(elements, str):
            raise ValueError(f"elements must be None, 'all' or a list of element symbols, got {elements!r}")
        mask = torch.zeros(MAX_ATOMIC_NUMBER, dtype=torch.bool)
        for symbol in elements:
            if not isinstance(symbol, str) or not Element.is_valid_symbol(symbol):
                raise ValueError(f"elements: {symbol!r} is not an element symbol")
            z = Element(symbol).Z
            if z > MAX_ATOMIC_NUMBER:
                raise ValueError(f"elements: {symbol} (Z = {z}) is beyond the model's {MAX_ATOMIC_NUMBER} elements")
            mask[z - 1] = True
        if not mask.any():
            raise ValueError("elements: give at least one element")
        return mask

    def resolve_schedule(self, schedule: "VelocitySchedule | str | Path | bool | None" = None) -> "VelocitySchedule | None":
        """The velocity schedule a ``schedule`` argument of :meth:`sampler` stands for (checked for this model)."""
        from crystalign.schedule import VelocitySchedule

        if schedule is None or schedule is True:
            return self.schedule
        if schedule is False:
            return None
        if isinstance(schedule, VelocitySchedule):
            return schedule.checked_for(self)
        if isinstance(schedule, (str, Path)):
            return VelocitySchedule.from_rl_checkpoint(schedule).checked_for(self, where=str(schedule))
        raise TypeError(f"schedule must be None, True, False, a path or a VelocitySchedule, got {type(schedule).__name__}")

    @torch.no_grad()
    def sample(self, template: CrystalBatch, seed: int | None = None, generator: torch.Generator | None = None, **sampler_overrides) -> CrystalBatch:
        """New structures with the compositions (species, n_atoms) of ``template``; ``seed=None`` draws a fresh
        seed (different structures on every call), a ``generator`` continues its stream."""
        if generator is None:
            generator = cpu_generator(seed)
        x0 = self.base_sample(template.species, template.n_atoms, generator)
        out = self.sampler(**sampler_overrides).sample(x0, generator=generator)
        return out.replace(ids=template.ids)

    def atom_counts(self) -> dict[int, int]:
        """Atom counts of the training crystals and how often each occurs (a DNG model draws new crystals' sizes
        from it); from the coverage record, or the range of sizes seen when an older record lacks the counts."""
        cov = self.coverage or {}
        if cov.get("n_atoms_counts"):
            return {int(n): int(c) for n, c in cov["n_atoms_counts"].items()}
        lo, hi = cov.get("n_atoms_min"), cov.get("n_atoms_max")
        if lo is None or hi is None:
            raise ValueError("this model does not record the atom counts it was trained on: give the atoms per crystal (atoms=K, --atoms K)")
        return {n: 1 for n in range(int(lo), int(hi) + 1)}

    def dng_template(self, n: int, atoms: int | Sequence[int] | None = None, seed: int | None = 0) -> CrystalBatch:
        """A batch of ``n`` fully masked crystals whose sizes are ``atoms`` (one count, or one per crystal) or drawn
        from the training distribution with ``seed``; ids are ``dng_000000``, ..."""
        import numpy as np

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if atoms is None:
            counts = self.atom_counts()
            # a stream of its own: the sampler's stream (same seed) then matches `crystalign generate`'s
            rng = np.random.default_rng(None if seed is None else [check_seed(seed), 0x5A7E])
            sizes = sorted(counts)
            weights = np.array([counts[k] for k in sizes], dtype=np.float64)
            n_atoms = torch.as_tensor(rng.choice(sizes, size=n, p=weights / weights.sum()), dtype=torch.long)
        else:
            n_atoms = torch.as_tensor([atoms] * n if isinstance(atoms, int) else list(atoms), dtype=torch.long)
            if n_atoms.numel() != n:
                raise ValueError(f"atoms gives {n_atoms.numel()} counts for {n} crystals")
            lo, hi = 1, self.config.max_atoms
            bad = [int(k) for k in n_atoms if not lo <= int(k) <= hi]
            if bad:
                cov = self.coverage or {}
                seen = f" (trained on {cov['n_atoms_min']}..{cov['n_atoms_max']} atoms)" if "n_atoms_min" in cov else ""
                raise ValueError(f"atoms={bad[0]} is outside this model's range {lo}..{hi}{seen}")
        total = int(n_atoms.sum())
        return CrystalBatch(
            species=torch.zeros(total, dtype=torch.long),
            frac=torch.zeros(total, 3),
            lattice=torch.eye(3).repeat(n, 1, 1),
            n_atoms=n_atoms,
            ids=[f"dng_{i:06d}" for i in range(n)],
        )

    @torch.no_grad()
    def generate(
        self, n: int, atoms: int | Sequence[int] | None = None, seed: int | None = 0, batch_size: int = 256,
        callback=None, **sampler_overrides,
    ) -> CrystalBatch:
        """``n`` new crystals from a de novo model: species, positions and lattice generated together.

        ``atoms``: atoms per crystal (one count for all, or one per crystal); default: drawn from the training
        crystals. One random stream runs through the batches, so a seed reproduces the same crystals for the same
        ``n``, ``atoms`` and ``batch_size``. ``callback(done, total)`` is called after every batch.
        ``elements``: the elements new crystals may contain (default: the training crystals'; ``"all"``; or a
        list of symbols), and the other ``sampler_overrides`` (steps, method, ...): see :meth:`sampler`.
        """
        if not self.is_dng:
            raise ValueError(
                "this is a crystal structure prediction (CSP) model: it needs compositions (`crystalign sample`, "
                "Generator.sample_compositions); de novo generation needs a DNG model such as perov_5_dng"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        template = self.dng_template(n, atoms, seed=seed)
        g = cpu_generator(seed)
        out = []
        for part in template.split(batch_size):
            out.append(self.sample(part, generator=g, **sampler_overrides))
            if callback is not None:
                callback(sum(p.num_structures for p in out), n)
        return CrystalBatch.cat(out)

    def sample_compositions(
        self, compositions: "Sequence[str | Composition] | str | Composition", n: int = 1, seed: int | None = 0,
        batch_size: int = 256, **sampler_overrides,
    ):
        """pymatgen Structures: ``n`` per composition (a formula, a pymatgen Composition, or a list of them), in
        order (composition-major).

        One random stream runs through the batches of ``batch_size`` structures, so a seed reproduces the same
        structures for the same compositions, ``n`` and ``batch_size``; changing either draws other structures.
        """
        self.check_csp("sample_compositions")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        template = composition_batch(compositions, n, max_atoms=self.config.max_atoms)
        g = cpu_generator(seed)  # one stream through all batches, as `crystalign sample` draws it
        out = [self.sample(part, generator=g, **sampler_overrides) for part in template.split(batch_size)]
        return CrystalBatch.cat(out).to_structures()

    # ------------------------------------------------------------------ persistence
    def checkpoint_dict(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        # an RL-tuned model stores only its tuned network; the base network comes from its base model on loading
        net = self.net.tuned if self.tuned_from is not None else self.net
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": to_dict(self.config),
            "base": self.base.to_config(),
            "coverage": self.coverage,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            **({"schedule": self.schedule.to_dict()} if self.schedule is not None else {}),
            **({"tuned_from": dict(self.tuned_from)} if self.tuned_from is not None else {}),
            **(extra or {}),
        }

    @classmethod
    def tuned(
        cls, base: "Generator", net: torch.nn.Module, fields: Sequence[str], base_model: str,
        anneal: Mapping[str, float] | None = None, steps: int | None = None, anneal_cap: float | None = None,
    ) -> "Generator":
        """An RL-tuned model: the velocities of ``fields`` from ``net`` (the reinforced copy of ``base.net``), every
        other output from ``base``. Its default sampler is Euler with the run's velocity annealing ``anneal``
        (``{"pos": s}``; none by default) and its ``anneal_cap`` at ``steps`` time points (default: the base's),
        the mean path of the velocity-based policy.

        ``base_model`` is how a saved copy finds its base again: a shipped model name, or a path (relative paths are
        taken from the saved model's folder)."""
        from crystalign.model.tuned import FieldSplitNet

        if base.tuned_from is not None:
            raise ValueError("the base of an RL-tuned model must be a base model, not another RL-tuned model")
        config = from_dict(GeneratorConfig, to_dict(base.config))
        config.sampling.follow_policy(anneal, steps, anneal_cap)
        with torch.random.fork_rng(devices=[]):
            gen = cls(config, base.base, coverage=base.coverage)
        gen.net = FieldSplitNet(base.net, net, fields)
        gen.tuned_from = {"fields": list(fields), "model": str(base_model), "hash": base.model_hash()}
        gen.requires_grad_(False)
        return gen.eval()

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any], where: str = "checkpoint", folder: str | Path | None = None) -> "Generator":
        """The model a checkpoint dict holds; ``folder``: where an RL-tuned model's relative base path starts."""
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{where}: not a crystalign generator checkpoint (format={found}){omatg_hint(ckpt, where)}")
        version = ckpt.get("format_version")
        if version != CHECKPOINT_VERSION:
            raise ValueError(f"{where}: checkpoint format version {version} is not supported by this crystalign (expects {CHECKPOINT_VERSION})")
        config = from_dict(GeneratorConfig, ckpt["config"], where=f"{where}:config")
        with torch.random.fork_rng(devices=[]):  # the random initialisation is overwritten: leave the caller's RNG as it was
            gen = cls(config, BaseDistribution.from_config(ckpt["base"]), coverage=ckpt.get("coverage"))
        state = ckpt["state_dict"]
        dtypes = {v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        if dtypes == {torch.float64}:  # a model trained in float64 stays float64 (load_state_dict would round it);
            gen = gen.to(dtype=torch.float64)  # half-precision weights load as float32, the geometry's minimum
        missing, unexpected = gen.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{where}: network weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        if ckpt.get("schedule") is not None:
            from crystalign.schedule import VelocitySchedule

            gen.schedule = VelocitySchedule.from_dict(ckpt["schedule"], where=f"{where}:schedule").checked_for(gen, where=f"{where}:schedule")
        if ckpt.get("tuned_from") is not None:
            sampling = config.sampling  # the tuned model's own default sampler (its RL run's annealing and steps)
            gen = cls.tuned(
                _tuned_base(ckpt["tuned_from"], where, folder), gen.net, ckpt["tuned_from"].get("fields") or [], ckpt["tuned_from"]["model"],
                anneal={"pos": sampling.anneal_pos, "cell": sampling.anneal_cell}, steps=sampling.steps,
                anneal_cap=sampling.anneal_cap,
            )
        gen.eval()
        return gen

    @classmethod
    def load(cls, name_or_path: str | Path, map_location: str | torch.device = "cpu") -> "Generator":
        """Load a shipped model by name or a checkpoint file (a training checkpoint or an exported model)."""
        path = resolve_model(name_or_path)
        ckpt = read_checkpoint_file(path, map_location, what="crystalign model checkpoint")
        if isinstance(ckpt, dict) and isinstance(ckpt.get("generator"), dict):  # a Lightning training checkpoint
            ckpt = ckpt["generator"]
        return cls.from_checkpoint_dict(ckpt, where=str(path), folder=path.parent)

    def model_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _tuned_base(info: Any, where: str, folder: str | Path | None) -> Generator:
    """The base model an RL-tuned checkpoint names, found and checked to be the one it was reinforced from."""
    if not isinstance(info, dict) or not isinstance(info.get("model"), str) or not isinstance(info.get("hash"), str):
        raise ValueError(f"{where}: damaged RL-tuned model: 'tuned_from' needs the base 'model' and its 'hash'")
    name = info["model"]
    candidates = [Path(folder) / name] if folder is not None and not Path(name).is_absolute() else []
    path = shipped_models().get(name) or next((p for p in [*candidates, Path(name)] if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"{where}: its base model {name!r} is missing (not a shipped model, not a file"
            f"{' in ' + str(folder) if folder is not None else ''}); the RL-tuned model needs the base it was reinforced from"
        )
    base = Generator.load(path)
    if base.model_hash() != info["hash"]:
        raise ValueError(
            f"{where}: its base model {name!r} ({path}) has hash {base.model_hash()}, but the model was reinforced from "
            f"a base with hash {info['hash']}: it needs that base model"
        )
    return base


def pretrained_dir() -> Path:
    return Path(__file__).parent / "pretrained"


def shipped_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(pretrained_dir().glob("*.pt"))}


def resolve_model(name_or_path: str | Path) -> Path:
    models = shipped_models()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    path = Path(name_or_path)
    if path.exists():
        return path
    raise FileNotFoundError(f"unknown model {name_or_path!r}: not a shipped model ({', '.join(models) or 'none'}) nor an existing file")


def cpu_generator(seed: int | None) -> torch.Generator:
    """Random numbers are drawn on the CPU and moved, so a seed gives the same structures on any device.
    ``None``: a fresh nondeterministic seed (an unseeded torch.Generator would always start from the same one)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(check_seed(seed))
    return g


def check_seed(seed: Any) -> int:
    """``seed`` as a Python int (numpy integers included); a TypeError naming it otherwise."""
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer or None, got {type(seed).__name__} {seed!r}") from None


# ---------------------------------------------------------------------- compositions
_FORMULA_CHARS = re.compile(r"^[A-Za-z0-9().\s]+$")


def parse_composition(formula: str, max_atoms: int | None = None) -> list[int]:
    """Atomic numbers of one cell of ``formula`` (e.g. ``SrTiO3`` -> [38, 22, 8, 8, 8]).

    Raises ValueError naming the formula for unknown elements, fractional counts or too many atoms.
    """
    from pymatgen.core import Composition

    if isinstance(formula, Composition):
        formula = cell_formula(formula)
    elif formula is not None and not isinstance(formula, str):
        raise TypeError(f"a composition must be a formula string or a pymatgen Composition, got {type(formula).__name__} {formula!r}")
    text = (formula or "").strip()
    if not text or not _FORMULA_CHARS.match(text):
        raise ValueError(f"cannot parse composition {formula!r}: expected a formula such as SrTiO3")
    try:
        comp = Composition(text)
    except Exception as err:  # noqa: BLE001 - pymatgen raises several kinds
        raise ValueError(f"cannot parse composition {formula!r}: {err}") from None
    if comp.num_atoms == 0:
        raise ValueError(f"composition {formula!r} has no atoms")
    # pymatgen drops elements written with a zero count (Sr0TiO3 -> TiO3); a typo must not change the query
    dropped = sorted(set(re.findall(r"[A-Z][a-z]?", text)) - {getattr(el, "symbol", str(el)) for el in comp})
    for sym in dropped:
        if not re.search(rf"{sym}0(?![\d.])", text):
            # not a zero count: pymatgen read the symbol as something else (T and D as hydrogen isotopes)
            after = re.search(rf"{sym}([A-Z])", text)
            guess = f"{sym}{after.group(1).lower()}" if after else ""
            from pymatgen.core.periodic_table import Element

            hint = f"; did you mean {guess}?" if guess and Element.is_valid_symbol(guess) else ""
            raise ValueError(f"composition {formula!r}: {sym} is not an element symbol this model can use{hint}")
    if dropped:
        raise ValueError(f"composition {formula!r}: element(s) {', '.join(dropped)} have a zero count; give positive counts")
    species: list[int] = []
    for el, amt in comp.items():
        if not hasattr(el, "Z") or getattr(el, "is_dummy", False) or el.Z < 1 or el.Z > MAX_ATOMIC_NUMBER:
            raise ValueError(f"composition {formula!r}: unknown or unsupported element {getattr(el, 'symbol', el)}")
        if abs(amt - round(amt)) > 1e-6:
            raise ValueError(f"composition {formula!r}: fractional count {amt} of {el}; give integer counts per cell")
        species += [el.Z] * int(round(amt))
    if max_atoms is not None and len(species) > max_atoms:
        raise ValueError(f"composition {formula!r} has {len(species)} atoms, more than this model's maximum of {max_atoms}")
    return sorted(species)


def cell_formula(composition: "Composition") -> str:
    """One cell's formula with its counts, in the composition's element order (``Sr2Ti2O6``, not ``Sr2 Ti2 O6``).

    Raises ValueError for a fractional count (a cell holds whole atoms), as for a formula string."""
    counts = []
    for el, n in composition.items():
        if abs(n - round(n)) > 1e-6:
            raise ValueError(f"composition {composition.formula!r}: fractional count {n:g} of {el}; give integer counts per cell")
        counts.append((el, int(round(n))))
    return "".join(f"{el}{'' if n == 1 else n}" for el, n in counts)


def composition_batch(compositions: "Sequence[str | Composition] | str | Composition", n: int = 1, max_atoms: int | None = None) -> CrystalBatch:
    """A template batch (species and atom counts only) with ``n`` copies of each composition, contiguous.

    ``compositions``: formulas or pymatgen Compositions, or a single one. Ids are ``{formula}_{j}``
    (j = 0..n-1); a formula given again continues its count (``_n``, ...), so ids stay unique.
    """
    from pymatgen.core import Composition

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(compositions, (str, Composition)):  # one formula, not a sequence of characters or elements
        compositions = [compositions]
    elif not isinstance(compositions, Iterable):
        raise TypeError(
            f"compositions must be a formula, a pymatgen Composition or a list of them, got {type(compositions).__name__}"
        )
    compositions = [cell_formula(c) if isinstance(c, Composition) else c for c in compositions]
    if not compositions:
        raise ValueError("no compositions given")
    species, counts, ids = [], [], []
    seen: dict[str, int] = {}
    for formula in compositions:
        z = parse_composition(formula, max_atoms)
        # ids name the output files: a repeated formula continues its counter instead of reusing (overwriting) ids
        start = seen.get(formula, 0)
        seen[formula] = start + n
        for j in range(start, start + n):
            species.append(torch.tensor(z))
            counts.append(len(z))
            ids.append(f"{formula}_{j}")
    total = sum(counts)
    return CrystalBatch(
        species=torch.cat(species),
        frac=torch.zeros(total, 3),
        lattice=torch.eye(3).repeat(len(counts), 1, 1),
        n_atoms=torch.tensor(counts),
        ids=ids,
    )
