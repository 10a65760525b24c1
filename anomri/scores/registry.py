"""The one registry of novelty scores.

Every score is a small function ``f(ctx: ScoreContext) -> Tensor[N]`` whose
docstring gives its formula. Sign convention, for every score: **higher = more
novel**. Register with :func:`register_score`; look up with :func:`get_scores`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from anomri.scores.context import ScoreContext

ScoreFunction = Callable[["ScoreContext"], "torch.Tensor"]

__all__ = ["NoveltyScore", "register_score", "get_scores", "score_ids", "REGISTRY"]


@dataclass(frozen=True)
class NoveltyScore:
    """A registered novelty score.

    Attributes
    ----------
    id : str
        Stable identifier, used in file names (``desc-<id>``) and the config.
    func : callable
        ``func(ctx) -> Tensor`` of shape (N,), higher = more novel.
    formula : str
        The formula in plain text, written to each map's JSON sidecar.
    needs_reference : bool
        Whether the score compares against the healthy reference set Y.
    """

    id: str
    func: ScoreFunction
    formula: str
    needs_reference: bool = False

    @property
    def description(self) -> str:
        """The docstring of the score function, without indentation."""
        return inspect.cleandoc(self.func.__doc__ or "")


REGISTRY: dict[str, NoveltyScore] = {}


def register_score(score_id: str, formula: str, needs_reference: bool = False) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator adding a score function to :data:`REGISTRY` under ``score_id``."""

    def decorator(func: ScoreFunction) -> ScoreFunction:
        if score_id in REGISTRY:
            raise ValueError(f"score id {score_id!r} registered twice")
        REGISTRY[score_id] = NoveltyScore(score_id, func, formula, needs_reference)
        return func

    return decorator


def score_ids() -> list[str]:
    """All registered score ids, in registration order."""
    _load_builtin_scores()
    return list(REGISTRY)


def get_scores(selection: str | Sequence[str] = "all") -> list[NoveltyScore]:
    """Resolve ``"all"`` or a list of ids to registered scores.

    Raises
    ------
    KeyError
        For an unknown id, naming the known ones.
    """
    _load_builtin_scores()
    if isinstance(selection, str):
        selection = list(REGISTRY) if selection == "all" else [selection]
    unknown = [s for s in selection if s not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown score(s) {unknown}; known: {', '.join(REGISTRY)}")
    return [REGISTRY[s] for s in selection]


def _load_builtin_scores() -> None:
    # Importing the package registers every built-in score exactly once.
    import anomri.scores  # noqa: F401
