"""Recipes: small configurations of every task that train in minutes on a laptop CPU, on built-in data.

Each recipe is a YAML file in this folder: ``task``, a one-line ``summary``, what it ``reaches``, how many
``minutes`` it takes on 2 CPU cores, and ``config`` (the task's config fields, as in a ``--config`` file).
``intern2 train TASK --recipe NAME`` starts from the recipe's config; ``--config`` and ``--set`` then override it.
``intern2 demo`` is made of these recipes (scaled by ``--budget``), so the demo's figures are what they reach.
"""
from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

__all__ = ["Recipe", "list_recipes", "get_recipe", "config_text", "recipes_main"]

_FOLDER = Path(__file__).parent
_KEYS = {"task", "summary", "reaches", "minutes", "config"}


@dataclass(frozen=True)
class Recipe:
    """A shipped configuration of one task (see the module docstring for the fields)."""
    name: str
    task: str
    summary: str
    reaches: str
    minutes: float
    config: Dict[str, Any]

    @property
    def path(self) -> Path:
        return _FOLDER / f"{self.name}.yaml"


def _read(path: Path) -> Recipe:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or set(data) != _KEYS:  # a shipped file: a mistake here is ours, not the user's
        raise RuntimeError(f"recipe {path}: expected the keys {sorted(_KEYS)}")
    return Recipe(name=path.stem, **data)


def list_recipes(task: Optional[str] = None) -> List[Recipe]:
    """Every shipped recipe (of ``task`` only, if given), sorted by task then name."""
    recipes = [_read(path) for path in sorted(_FOLDER.glob("*.yaml"))]
    return sorted((r for r in recipes if task in (None, r.task)), key=lambda r: (r.task, r.name))


def get_recipe(name: str, task: Optional[str] = None, what: str = "--recipe") -> Recipe:
    """The recipe called ``name``; a ValueError (naming ``what`` and the known recipes) when there is none (of
    ``task``)."""
    path = _FOLDER / f"{name}.yaml"
    if "/" in name or not path.is_file():
        known = ", ".join(r.name for r in list_recipes(task))
        raise ValueError(f"{what} {name!r}: no such recipe{f' for {task}' if task else ''}; known: {known}")
    recipe = _read(path)
    if task is not None and recipe.task != task:
        raise ValueError(f"{what} {name!r} trains {recipe.task}, not {task}: run 'intern2 train {recipe.task} "
                         f"--recipe {name}'")
    return recipe


def config_text(recipe: Recipe) -> str:
    """The recipe as a ``--config`` file for its task: its ``config`` section (comments kept) under its other
    fields as comments."""
    lines = recipe.path.read_text().splitlines()
    start = lines.index("config:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "#")), len(lines))
    about = [line if line.startswith("#") else f"# {line}" for line in lines[:start] + lines[end:] if line.strip()]
    usage = f"# use: intern2 train {recipe.task} --config THIS_FILE (--set KEY=VALUE overrides it)"
    body = textwrap.dedent("\n".join(lines[start + 1:end]))
    return "\n".join([*about, usage, body]) + "\n"


def recipes_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 recipes [--task TASK] [NAME]`: list the recipes, or print one's YAML."""
    parser = argparse.ArgumentParser(prog="intern2 recipes", description="List the shipped training recipes "
                                     "(small CPU configurations), or print one: intern2 recipes NAME.")
    parser.add_argument("name", nargs="?", help="a recipe to print as a --config YAML file (a starting point)")
    parser.add_argument("--task", help="only the recipes of this task")
    args = parser.parse_args(argv)
    if args.name:
        try:
            recipe = get_recipe(args.name, args.task, what="recipe")
        except ValueError as exc:
            parser.error(str(exc))
        print(config_text(recipe), end="")
        return 0
    recipes = list_recipes(args.task)
    if not recipes:
        parser.error(f"--task {args.task!r}: no recipes; tasks with recipes: "
                     f"{', '.join(sorted({r.task for r in list_recipes()}))}")
    width = max(len(r.name) for r in recipes)
    for recipe in recipes:
        print(f"{recipe.name:<{width}}  {recipe.task:<14} {f'~{recipe.minutes:g} min':<9} {recipe.summary}; "
              f"{recipe.reaches}")
    print("\n(minutes: on 2 CPU cores) run one: intern2 train <task> --recipe <name> (--set KEY=VALUE overrides it); "
          "intern2 recipes <name> prints its YAML")
    return 0
