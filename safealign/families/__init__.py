"""Model families behind one interface (``safealign.families.base.Family``), by name.

``FAMILIES`` is the one place the family names live. Entries are lazy (``"module:Class"``): naming or checking
a family imports nothing; ``get_family`` imports the one asked for. ``FAMILY_SETTINGS`` names, per family, the
params sections that family owns and the function that validates them (called by params validation only when
that family is chosen).
"""
from __future__ import annotations

from typing import Any

from safealign.core.registry import Registry

FAMILIES: Registry[Any] = Registry("model family")
FAMILIES.add_lazy("toy", "safealign.families.toy:ToyFamily")
FAMILIES.add_lazy("sd15", "safealign.families.sd:SD15Family")
FAMILIES.add_lazy("sd21", "safealign.families.sd:SD21Family")
FAMILIES.add_lazy("sdxl", "safealign.families.sd:SDXLFamily")

# family -> {params section: "module:validate(raw, params, source) -> validated section"}
FAMILY_SETTINGS: dict[str, dict[str, str]] = {
    "toy": {"toy": "safealign.toyworld.settings:validate_toy"},
}


def get_family(name: str) -> Any:
    """The family class registered under ``name``."""
    return FAMILIES.get(name)
