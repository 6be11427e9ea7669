"""Hydra finds sweepers and launchers only in its plugin registry, filled by scanning the hydra_plugins package.

A regular install puts hydra_plugins/cnnlab_search and cnnlab_fused next to the other plugins, where the
scan finds them. An editable install (`pip install -e .`) maps them through setuptools' import hook,
which the scan cannot list, so `hydra/sweeper=optuna` or `hydra/launcher=fused` would be unknown
plugins. Registering the classes ourselves, before Hydra starts, works for every kind of install.
"""
from __future__ import annotations


def register_plugins() -> None:
    """Add cnnlab's Optuna sweeper and fused launcher to Hydra's plugin registry unless the scan found them."""
    from hydra.core.plugins import Plugins

    # light: no Optuna, no torch
    from hydra_plugins.cnnlab_fused.fused_launcher import FusedLauncher
    from hydra_plugins.cnnlab_search.optuna_sweeper import OptunaSweeper

    plugins = Plugins.instance()
    for plugin in (OptunaSweeper, FusedLauncher):
        if f"{plugin.__module__}.{plugin.__name__}" not in plugins.class_name_to_class:
            plugins._register(plugin)  # Hydra 1.3's own registration (pinned <1.4 in pyproject)
