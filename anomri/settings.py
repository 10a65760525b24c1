"""The pipeline's default settings: one source for the workflow, the CLI and the Python API.

``anomri/data/defaults.yaml`` is shipped with the package and holds the values
of the workflow's ``config.yaml`` (a test keeps them equal), so the flags of
``anomri <command>`` and the defaults of :class:`~anomri.models.training.TrainingConfig`,
:class:`~anomri.maps.postprocess.PostProcessing`, :class:`~anomri.maps.novelty.NoveltyModel`
and the rest are those of the evaluated pipeline.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources

import yaml

__all__ = ["default", "defaults"]


@cache
def _load() -> dict:
    return yaml.safe_load(resources.files("anomri").joinpath("data", "defaults.yaml").read_text())


def defaults() -> dict:
    """Every default setting, nested as in ``config.yaml`` (a copy: change it freely)."""
    return copy.deepcopy(_load())


def default(key: str):
    """One default, by its dotted ``config.yaml`` key: ``default("probability.erosion_voxels")`` -> 1."""
    value = _load()
    for part in key.split("."):
        value = value[part]
    return copy.deepcopy(value)
