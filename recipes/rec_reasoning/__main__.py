"""`python -m recipes.rec_reasoning --config debug [key=value ...]` (the form `ray job submit` runs)."""

from recipes.rec_reasoning.main import cli

if __name__ == "__main__":
    raise SystemExit(cli())
