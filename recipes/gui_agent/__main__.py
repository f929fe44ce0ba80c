"""`python -m recipes.gui_agent --config debug [key=value ...]` (the form `ray job submit` runs)."""

from recipes.gui_agent.main import cli

if __name__ == "__main__":
    raise SystemExit(cli())
