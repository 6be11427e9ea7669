"""Running inside Jupyter (or Colab): progress bars and figures that show in the notebook."""
from __future__ import annotations

import io
import sys
from typing import Any


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not in a terminal IPython)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell" or "google.colab" in sys.modules


def progress_bar() -> type:
    """tqdm's notebook widget where Jupyter can draw it (ipywidgets installed), else the text bar."""
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401 - tqdm.notebook needs it to draw the bar
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm


def show_figures_inline() -> None:
    """Let a matplotlib Figure returned by a cell show as a picture, whatever the backend: cnnlab makes
    its figures without pyplot, so they are not tied to the notebook's inline backend."""
    if not in_notebook():
        return
    from IPython import get_ipython
    from matplotlib.figure import Figure

    def png(fig: Any) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()

    get_ipython().display_formatter.formatters["image/png"].for_type(Figure, png)
