"""`python -m recipes.sgrec_a2po --config debug [key=value ...]` (the form `ray job submit` runs)."""

from recipes.sgrec_a2po.main import cli

if __name__ == "__main__":
    raise SystemExit(cli())
