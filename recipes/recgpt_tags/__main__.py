"""`python -m recipes.recgpt_tags --config debug [key=value ...]` (the form `ray job submit` runs)."""

from recipes.recgpt_tags.main import cli

if __name__ == "__main__":
    raise SystemExit(cli())
