"""crystalign: steerable generative crystal structure prediction.

Example::

    import crystalign
    result = crystalign.predict("SrTiO3", n=16, rl_steps=10)
    print(result.structures[0], result.energies[0])

    steered = crystalign.steer("perov_5", lambda ss: [s.density for s in ss], ["SrTiO3"], iterations=10)
    steered.sample("SrTiO3", n=4)
"""

__version__ = "0.1.0"
__all__ = [
    "CrystalBatch", "Generator", "SteeredModel", "csp_metrics", "load_dataset", "make_reward", "predict", "steer", "__version__",
]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    # heavy modules (torch, pymatgen analysis, MLIPs) load on first use, keeping `import crystalign` (and so the
    # command's --help) fast and letting crystalign.settings.configure_threads run before torch starts; no lazy
    # name may be a submodule's name, or importing that submodule would replace the attribute by the module
    if name == "CrystalBatch":
        from crystalign.crystal import CrystalBatch

        return CrystalBatch
    if name == "Generator":
        from crystalign.generator import Generator

        return Generator
    if name == "predict":
        from crystalign.prediction import predict

        return predict
    if name == "csp_metrics":
        from crystalign.metrics import csp_metrics

        return csp_metrics
    if name == "load_dataset":
        from crystalign.data import load_dataset

        return load_dataset
    if name in ("steer", "SteeredModel"):
        from crystalign import steering

        return getattr(steering, name)
    if name == "make_reward":
        from crystalign.rewards import make_reward

        return make_reward
    raise AttributeError(f"module 'crystalign' has no attribute {name!r}")
