"""`qrun compare` and `qrun demo` (evaluation issue)."""

COMMANDS: list = []
