"""docs/ against the code: every number of docs/recipes.md's tables is the
code's (engine/recipes.py, trainers/mining.py, trainers/metrics.py,
trainers/ensemble.py), and the docs/ files the code cites exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from engine.recipes import RECIPES, SIZE_CLASS_EDGES, View

ROOT = Path(__file__).resolve().parents[1]
RECIPES_MD = ROOT / "docs" / "recipes.md"


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of `text` as a list of rows {header: cell}."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                rows.append(dict(zip(header, cells)))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def table_with(column: str) -> list[dict[str, str]]:
    """The one table of docs/recipes.md with this column."""
    matches = [t for t in tables(RECIPES_MD.read_text()) if t and column in t[0]]
    assert len(matches) == 1, f"docs/recipes.md: {len(matches)} tables with a column {column!r}"
    return matches[0]


def value(cell: str):
    """A cell as a Python value: `none` -> None, numbers and tuples as literals,
    anything else as its text (backticks stripped)."""
    cell = cell.strip().strip("`")
    if cell == "none":
        return None
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return cell


def same(a, b) -> bool:
    """Equal as values: numbers compare as floats, tuples element by element."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def by_member(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    members = {row["member"]: row for row in rows}
    assert set(members) == set(RECIPES), "docs/recipes.md must list every member once"
    assert len(rows) == len(RECIPES)
    return members


def test_shared_fields_are_every_recipes():
    rows = {row["field"]: value(row["value"]) for row in table_with("field")}
    assert set(rows) == {"encoder", "img_size", "batch_size", "weight_decay", "grad_clip"}
    for recipe in RECIPES.values():
        for name, expected in rows.items():
            assert same(getattr(recipe, name), expected), (recipe.name, name)


RECIPE_COLUMNS = {
    "role": "ensemble_role", "weight": "ensemble_weight", "in ch": "in_channels",
    "init": "init", "epochs": "epochs", "early stop": "early_stop", "lr": "lr",
    "schedule": "schedule", "focal alpha": "focal_alpha", "focal gamma": "focal_gamma",
    "focal weight": "focal_weight", "dice weight": "dice_weight",
    "select on": "select_on", "mining": "mining",
}


def test_recipe_table_matches_recipes():
    rows = by_member(table_with("focal alpha"))
    for name, row in rows.items():
        assert set(row) == {"member"} | set(RECIPE_COLUMNS)
        for column, field in RECIPE_COLUMNS.items():
            assert same(value(row[column]), getattr(RECIPES[name], field)), \
                f"docs/recipes.md, {name}, {column}: {row[column]!r} but engine/recipes.py " \
                f"has {getattr(RECIPES[name], field)!r}"


def parse_view(cell: str) -> tuple[str, dict]:
    kind, *pairs = cell.split(" ", 1)
    params = dict((k, value(v)) for k, v in re.findall(r"(\w+)=(\([^)]*\)|\S+)", "".join(pairs)))
    return kind, params


def test_sampling_table_matches_recipes():
    rows = by_member(table_with("area edges"))
    columns = {"area edges": "area_edges", "area weights": "area_weights",
               "hard negative weight": "hard_negative_weight",
               "hard FN weight": "hard_fn_weight", "epoch multiplier": "epoch_multiplier"}
    for name, row in rows.items():
        rule, view = RECIPES[name].sampling, RECIPES[name].view
        for column, field in columns.items():
            assert same(value(row[column]), getattr(rule, field)), (name, column)
        kind, params = parse_view(row["view"])
        assert kind == view.kind, name
        for key, expected in params.items():
            assert same(getattr(view, key), expected), (name, key)
        default = View(kind)
        changed = {f for f in ("side_range", "scale", "ratio", "side_mult", "min_side",
                               "negative_share")
                   if getattr(view, f) != getattr(default, f)}
        assert changed <= set(params), f"{name}: the view's {changed - set(params)} not in the doc"


def recipe_tokens(entries) -> list:
    """A recipe's augmentation as a flat sequence: op names, (key, value) pairs."""
    out = []
    for name, params in entries:
        out.append(name)
        for key, val in params.items():
            if key == "ops":
                out.extend(recipe_tokens(val))
            else:
                out.append((key, val))
    return out


def doc_tokens(cell: str) -> list:
    out = []
    for key, val, word in re.findall(r"(\w+)=(\([^)]*\)|[^\s\]·/]+)|(\w+)", cell):
        out.append((key, value(val)) if key else word)
    return out


def test_augmentation_table_matches_recipes():
    rows = by_member(table_with("augmentation, in order"))
    for name, row in rows.items():
        recipe = RECIPES[name]
        expected = recipe_tokens(recipe.augment)
        if recipe.copy_paste:
            expected = ["copy_paste"] + list(recipe.copy_paste.items()) + expected
        got = doc_tokens(row["augmentation, in order"])
        assert len(got) == len(expected), (name, got, expected)
        for g, e in zip(got, expected):
            if isinstance(e, tuple):
                assert isinstance(g, tuple) and g[0] == e[0] and same(g[1], e[1]), (name, g, e)
            else:
                assert g == e, (name, g, e)


def test_mining_metric_and_ensemble_constants():
    from trainers import ensemble, metrics, mining

    constants = {row["constant"]: value(row["value"])
                 for t in tables(RECIPES_MD.read_text()) if t and "constant" in t[0]
                 for row in t}
    for name in ("MINING_MEMBER", "HARD_NEGATIVE_PIXEL_SHARE", "HARD_NEGATIVE_KEEP",
                 "HARD_FN_RECALL"):
        assert same(constants[name], getattr(mining, name)), name
    assert same(constants["THRESHOLD"], metrics.THRESHOLD)
    for key, weight in metrics.RECALL_DICE_WEIGHTS.items():
        assert same(constants[f"RECALL_DICE_WEIGHTS {key}"], weight)
    modes = {row["mode"]: row for row in table_with("mode")}
    assert set(modes) == set(ensemble.MODES)
    for mode, post in ensemble.MODES.items():
        assert same(value(modes[mode]["threshold"]), post.threshold), mode
        assert same(value(modes[mode]["min area (px at 512)"]), post.min_area), mode


def test_size_classes_and_ela_in_prose():
    from preprocess import ela

    text = " ".join(RECIPES_MD.read_text().split())
    pct = [f"{edge * 100:g}" for edge in SIZE_CLASS_EDGES]
    assert (f"tiny < {pct[0]} %, small {pct[0]}-{pct[1]} %, medium {pct[1]}-{pct[2]} %, "
            f"large {pct[2]}-{pct[3]} %, xlarge >= {pct[3]} %") in text
    assert f"quality {ela.JPEG_QUALITY}" in text and f"x {ela.GAIN}," in text
    weights = ", ".join(str(RECIPES[n].ensemble_weight) for n in RECIPES
                        if RECIPES[n].ensemble_role == "average")
    assert f"({weights}, divided by" in text
    (union,) = [r for r in RECIPES.values() if r.ensemble_role == "union"]
    assert f"max(average, {union.ensemble_weight} x p_specialist)" in text


CITATION = re.compile(r"docs/([\w.-]+\.md)")


@pytest.mark.parametrize("folder", ["engine", "trainers", "preprocess", "benchmarks", "tests"])
def test_cited_docs_exist(folder):
    for path in (ROOT / folder).glob("*.py"):
        for name in CITATION.findall(path.read_text()):
            assert (ROOT / "docs" / name).is_file(), f"{path.name} cites docs/{name}"


def test_no_citation_outside_the_repository():
    """DESIGN.md, MEMBERS.md, REFERENCES.md and the seeds/ lived outside the
    repository; docs/ holds their content now."""
    stale = re.compile(r"DESIGN\.md|MEMBERS\.md|REFERENCES\.md|seeds/")
    files = [ROOT / "README.md", ROOT / "pyproject.toml", *(ROOT / "docs").glob("*.md")]
    files += [p for folder in ("engine", "trainers", "preprocess", "benchmarks", "tests")
              for p in (ROOT / folder).glob("*.py")
              if p.name != "test_docs.py"]
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in files
                 for n, line in enumerate(p.read_text().splitlines(), 1) if stale.search(line)]
    assert not offenders, offenders
