"""Per-device implementations of the ops declared in `ops/`. Importing this package
registers them; an op with no kernel for a device runs its reference meaning."""

from . import cpu, cuda  # noqa: F401
