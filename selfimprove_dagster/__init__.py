"""selfimprove_dagster: iterative LLM self-improvement as round-partitioned Dagster assets.

The core library (this package) is plain Python: importing it loads neither torch nor
Dagster. Heavy libraries are imported inside the functions that need them;
`selfimprove_dagster.definitions` is the Dagster composition root.

The Dagster layers live in the repository's top-level `assets/` and `resources/`
folders and are imported as `selfimprove_dagster.assets` and
`selfimprove_dagster.resources`, never by the generic top-level names, so an installed
copy neither shadows nor is shadowed by a user's own `assets` or `resources` package.
The wheel places the two folders inside this package (pyproject.toml, `force-include`);
in a checkout, `_LayerFinder` maps exactly those two names to the repository's folders.
"""

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

LAYERS = ("assets", "resources")
_REPO = Path(__file__).resolve().parents[1]


class _LayerFinder:
    """Finds `selfimprove_dagster.assets` / `.resources` in a checkout's top-level folders
    (consulted after the normal finders: an installed wheel's own copies win)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        package, _, layer = name.rpartition(".")
        if package != __name__ or layer not in LAYERS:
            return None
        folder = _REPO / layer
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if not any(isinstance(f, type) and f.__name__ == "_LayerFinder" for f in sys.meta_path):
    sys.meta_path.append(_LayerFinder)
