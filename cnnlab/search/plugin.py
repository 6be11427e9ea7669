"""Hydra finds a sweeper only in its plugin registry, filled by scanning the hydra_plugins package.

A regular install puts hydra_plugins/cnnlab_search next to the other plugins, where the scan finds
it. An editable install (`pip install -e .`) maps it through setuptools' import hook, which the
scan cannot list, so `hydra/sweeper=optuna` would be an unknown plugin. Registering the class
ourselves, before Hydra starts, works for every kind of install.
"""
from __future__ import annotations


def register_sweeper() -> None:
    """Add cnnlab's Optuna sweeper to Hydra's plugin registry unless the scan found it."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.cnnlab_search.optuna_sweeper import OptunaSweeper  # light: no Optuna, no torch

    plugins = Plugins.instance()
    if f"{OptunaSweeper.__module__}.{OptunaSweeper.__name__}" not in plugins.class_name_to_class:
        plugins._register(OptunaSweeper)  # Hydra 1.3's own registration (pinned <1.4 in pyproject)
