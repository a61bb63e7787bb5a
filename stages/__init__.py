"""The DVC stage commands, thin: each reads params, calls the library (``safealign``), writes its outputs
atomically. No stage imports another. ``python -m stages.<name> --help`` for each."""
