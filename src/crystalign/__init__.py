"""crystalign: steerable generative crystal structure prediction.

Example::

    from crystalign import CrystalBatch
    batch = CrystalBatch.from_structures(structures)
    print(batch.validity().valid)
"""

from crystalign.crystal import CrystalBatch

__version__ = "0.1.0"
__all__ = ["CrystalBatch", "__version__"]
