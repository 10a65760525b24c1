"""Novelty scores: one registry, each score documented with its formula.

Importing this package registers every built-in score. Higher = more novel.
"""

# Registration order is the order of get_scores("all").
from anomri.scores import latent, loss, reconstruction  # noqa: F401  (registration)
from anomri.scores import stochastic, nearest_neighbour, density, generative  # noqa: F401, I001  (registration)
from anomri.scores.registry import REGISTRY, NoveltyScore, get_scores, register_score, score_ids

__all__ = ["REGISTRY", "NoveltyScore", "get_scores", "register_score", "score_ids"]
