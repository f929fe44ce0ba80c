"""`python -m recipes.negfeedback_pgrpo --config debug [key=value ...]` (the form `ray job submit` runs)."""

from recipes.negfeedback_pgrpo.main import cli

if __name__ == "__main__":
    raise SystemExit(cli())
