"""The results.json contract: its JSON Schema (``results.schema.json`` beside this file), validation and reading.

The audit writes results.json and the report reads it; both import this module, so neither imports the other.

Version 1.x: one section per check, each with ``title``, ``config``, ``runtime_s``, ``headline``
(label, value, direction, unit, optional 95% interval), ``metrics``, ``tables`` (columns + rows),
``curves`` (the raw data plots are drawn from) and ``notes``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from pupil.errors import PupilError
from pupil.io import read_json

SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
MESSAGE_CHARS = 200  # jsonschema quotes the whole offending value; a long one is cut to keep the error one line


@cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(results: dict[str, Any], source: str = "results") -> None:
    """Raise PupilError naming the first place where ``results`` breaks the schema."""
    if problem := _problem(results, schema()):
        raise PupilError(f"{source} does not follow the results schema at {problem}")


def section_problem(section: Any) -> str | None:
    """Where and how one check's section breaks the schema ("headline: 'value' is a required property"), or None."""
    full = schema()
    return _problem(section, {"$schema": full["$schema"], **full["$defs"]["check"], "$defs": full["$defs"]})


def _problem(instance: Any, against: dict[str, Any]) -> str | None:
    import jsonschema

    try:
        jsonschema.validate(instance, against)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        message = e.message if len(e.message) <= MESSAGE_CHARS else e.message[: MESSAGE_CHARS - 1] + "…"
        return f"{where}: {message}"
    return None


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results.json (or the one inside a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    results = read_json(path, f"{path} does not exist: run `pupil audit` on the run first")
    validate(results, str(path))
    return results
