"""Files written whole, and versioned JSON files that travel between sites and the
server (statistics, tokenizer)."""

import json
from pathlib import Path

from fedclif.shared.errors import FedclifError


def write_text(text: str, path: str | Path) -> None:
    """Write whole or not at all: readers polling the file never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(obj: dict, path: str | Path) -> None:
    write_text(json.dumps(obj, indent=1, sort_keys=True), path)


def read_json(path: str | Path, fmt: str, version: int, what: str, hint: str = "") -> dict:
    """Load a JSON file and check its `format` and `version` fields; errors say which file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FedclifError(f"{what} file not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedclifError(f"{path} is not a JSON {what} file: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise FedclifError(
            f'{path} is not a fedclif {what} file (expected "format": "{fmt}")'
            + (f"; {hint}" if hint else "")
        )
    if raw.get("version") != version:
        raise FedclifError(
            f"{path} is {what} version {raw.get('version')}, this fedclif reads version {version}"
        )
    return raw
