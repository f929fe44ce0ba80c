"""`python -m recipes.gpr_hepo --config debug [key=value ...]` (the form `ray job submit` runs)."""

from recipes.gpr_hepo.main import cli

if __name__ == "__main__":
    raise SystemExit(cli())
