"""The pure scoring core: features, rules, model, decision (no I/O beyond loading files)."""
