"""A generated image world where RA-TTA can be checked on real pixels, with a trained CLIP.

- :mod:`ratta.world.vocabulary`: attribute tables and the object classes (data);
- :mod:`ratta.world.draw`: a scene -> an RGB picture (PIL);
- :mod:`ratta.world.scenes`: corpus and shifted test scenes, captions, CuPL descriptions;
- :mod:`ratta.world.write`: the world on disk (corpus shards, test split, descriptions);
- :mod:`ratta.world.model`: the shipped CLIP (config, vocabulary, weights);
- :mod:`ratta.world.train`: how the weights were trained (``benchmarks/train_world.py``);
- :mod:`ratta.world.demo`: ``ratta demo``, ratta's commands on the world, cached by content.

See docs/world.md.
"""

from ratta.world.vocabulary import CLASS_NAMES, CLASSES
from ratta.world.write import WorldSettings, write_world

__all__ = ["CLASSES", "CLASS_NAMES", "WorldSettings", "write_world"]
