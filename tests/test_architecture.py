"""docs/ARCHITECTURE.md against the code: its table of rooms (each module or package of
`platform/adm` and the rooms of `adm` it imports) is computed here from the sources with `ast`,
so a new import, a new module or a stale row fails this test, naming the row to write."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "platform" / "adm"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
NONE = "—"  # the table's mark for a room that imports no other room


def room_of(module: str) -> str | None:
    """The room of a dotted module of `adm` ("adm.data.shards" -> "data/", "adm.stage" ->
    "stage.py"), or None for a module outside `adm` or `adm` itself."""
    parts = module.split(".")
    if parts[0] != "adm" or len(parts) < 2:
        return None
    return f"{parts[1]}/" if (LIBRARY / parts[1]).is_dir() else f"{parts[1]}.py"


def module_name(path: Path) -> str:
    """The dotted name of a source file of `adm` (a package's `__init__.py` is the package)."""
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names, at any depth (an import inside a
    function counts: it runs as surely, only later), relative imports resolved. For
    ``from X import a, b`` both ``X.a`` and ``X.b`` are named: they may be modules."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def computed_table() -> dict[str, set[str]]:
    """room -> the other rooms of `adm` its files import (as bare names: "data", "stage")."""
    table: dict[str, set[str]] = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        if path == LIBRARY / "__init__.py":
            continue
        room = room_of(module_name(path))
        rooms = {room_of(m) for m in imported_modules(path)} - {None, room}
        table.setdefault(room, set()).update(r.rstrip("/").removesuffix(".py") for r in rooms)
    return table


def documented_table(text: str) -> list[tuple[str, set[str]]]:
    """The rows of the document's "## Rooms" table, in order: (room, the rooms it imports)."""
    section = text.split("## Rooms", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([\w/.]+)`", cells[0]) if len(cells) >= 3 else None
        if match:
            imports = cells[-1]
            rows.append((match.group(1), set() if imports == NONE else
                         {name.strip() for name in imports.split(",")}))
    return rows


def _row(room: str, imports: set[str]) -> str:
    return f"`{room}` imports {', '.join(sorted(imports)) or NONE}"


@pytest.fixture(scope="module")
def tables():
    return computed_table(), documented_table(DOC.read_text())


def test_every_room_and_its_imports_are_as_documented(tables):
    code, doc = tables
    documented = dict(doc)
    assert len(documented) == len(doc), "a room has two rows"
    problems = [f"no row for {_row(room, code[room])}" for room in sorted(set(code) - set(documented))]
    problems += [f"a row for {room}, which is not in platform/adm"
                 for room in sorted(set(documented) - set(code))]
    problems += [f"the row says {_row(room, documented[room])}; the code: {_row(room, code[room])}"
                 for room in sorted(set(code) & set(documented)) if code[room] != documented[room]]
    assert not problems, "docs/ARCHITECTURE.md's table of rooms is stale:\n" + "\n".join(problems)


def test_imports_run_downward_in_the_table(tables):
    """The document's rule: a room imports only rooms above its row."""
    _, doc = tables
    names = [room.rstrip("/").removesuffix(".py") for room, _ in doc]
    upward = [f"{room} imports {name}, which is not above it" for i, (room, imports) in
              enumerate(doc) for name in sorted(imports) if name not in names[:i]]
    assert not upward, upward


def test_no_room_goes_through_compat(tables):
    """`compat/` only names the reference's API for users; the library imports what it needs
    from where it is defined (`checkpoints`, `factory`)."""
    code, _ = tables
    assert not sorted(room for room, imports in code.items() if "compat" in imports)


def test_rooms_above_data_do_not_import_ray_when_imported(tables):
    """The rooms above the `data/` row leave `import ray` to their functions (a config is
    checked on the driver before Ray starts); only module-level statements are looked at."""
    _, doc = tables
    above = [room for room, _ in doc][:[room for room, _ in doc].index("data/")]
    eager = []
    for room in above:
        paths = sorted((LIBRARY / room).rglob("*.py")) if room.endswith("/") else [LIBRARY / room]
        for path in paths:
            for node in ast.parse(path.read_text()).body:  # module level only
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                eager += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n == "ray" or n.startswith("ray.")]
    assert not eager, eager


def test_every_config_is_a_config_class():
    """The document's claim that every config is a `config_class`: each class of the library
    and the jobs named *Config, *Settings or *Section is decorated with it."""
    plain = []
    for path in [*LIBRARY.rglob("*.py"), *(ROOT / "jobs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and re.search(r"(Config|Settings|Section)$",
                                                            node.name):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                if not any(d.split("(")[0] == "config_class" for d in decorators):
                    plain.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not plain, plain


def test_the_import_scanner_sees_each_form_of_import(tmp_path):
    """The table above is only as good as this scanner: absolute, relative (one and two dots,
    `from . import x`) and function-level imports all count, and a package's own modules do
    not count as imports of another room."""
    generate = LIBRARY / "generate" / "plan.py"
    assert {"adm.checkpoints", "adm.stage", "adm.config"} <= imported_modules(generate)
    assert room_of("adm.data.shards") == "data/" and room_of("adm.stage") == "stage.py"
    assert room_of("ray.train") is None and room_of("adm") is None
    code = computed_table()
    assert "presets" in code["train/"]  # imported inside a function of train/config.py
    assert "checkpoints" in code["stage.py"]  # `from . import checkpoints, factory`
    assert "train" not in code["train/"]


def test_a_config_class_built_positionally_names_the_field_in_its_error():
    """Jobs build some config classes from their flags positionally (jobs/evaluate.py's
    FeatureJob): a bound broken there is still named by the field, not by its position."""
    from adm.config import ConfigError
    from adm.evaluate.evaluation import FeatureJob

    with pytest.raises(ConfigError) as e:
        FeatureJob(64, 0)
    assert str(e.value) == "num_workers: must be positive, got 0"
