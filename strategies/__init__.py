"""One file per method; each registers itself with `framework.registry.register`.

Importing this package imports every module in its folder (no list to edit); the framework finds the
package through the `sparsevlm.strategies` entry point declared in pyproject.toml.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
