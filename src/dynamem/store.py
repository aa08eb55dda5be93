"""The raw results store: the truth every view (report, asv) is made from.

Layout of `results/raw/<run-id>/` (format version 1):

- `run.json` — `format`, `run_id`, `created`, `suite` (name and the TOML text),
  `seed`, `order` (cell ids in the order they run), `metadata` (host kernel, CPU model,
  QEMU version, accelerator and why, guest kernel, guest image key and package pins,
  dynamem version and git commit).
- `cells/<cell-id>.json` — one per finished cell, failed ones included: `scenario`,
  `repeat`, `status` (`ok` or `failed`), `error`, `console_tail`, `timings` (boot,
  preparation, warm-up, workload start, steps, overhead, total; seconds), `context`
  and `steps`: one record per step (a resize's record as `dynamem resize --json` prints
  it without its series, or a settle).
- `cells/<cell-id>.step<k>.npz` — the time series of step k (numpy arrays; times on the
  host monotonic clock in ns; `t_request_ns` is the request).

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a
half-written file; a cell's JSON is written last and marks the cell complete. A cell JSON
that fails validation is reported; on resume it is set aside as `<cell>.json.invalid` and
the cell runs again.
"""

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dynamem.errors import UserError

FORMAT_VERSION = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename, fsync the directory; on failure (e.g. disk full)
    the temporary is removed and the old file, if any, is untouched."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True, default=_jsonable) + "\n").encode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


RUN_KEYS = {"format", "run_id", "order"}  # what every reader needs (resume: suite, seed too)
STATUSES = ("ok", "failed")


def validate_cell(record: Any, cell_id: str) -> None:
    """ValueError naming the first thing wrong with a cell record (what every reader of the
    store relies on: report, summary, resume)."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    expected: dict[str, type] = {
        "scenario": str,
        "repeat": int,
        "status": str,
        "error": str,
        "steps": list,
        "timings": dict,
    }
    for key, kind in expected.items():
        if key not in record:
            raise ValueError(f"missing key {key!r}")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise ValueError(f"{key} is {type(record[key]).__name__}, expected {kind.__name__}")
    if record["status"] not in STATUSES:
        raise ValueError(f"status {record['status']!r} is not one of {', '.join(STATUSES)}")
    if record.get("cell", cell_id) != cell_id:
        raise ValueError(f"record of cell {record['cell']!r} in the file of {cell_id!r}")
    if not all(isinstance(step, dict) and "kind" in step for step in record["steps"]):
        raise ValueError("a step is not an object with a kind")
    if not all(isinstance(v, int | float) for v in record["timings"].values()):
        raise ValueError("timings must be numbers")


class RunStore:
    def __init__(self, directory: Path, run: dict[str, Any]) -> None:
        self.directory = directory
        self.run = run

    @property
    def cells_dir(self) -> Path:
        return self.directory / "cells"

    @classmethod
    def create(cls, directory: Path, run: dict[str, Any]) -> "RunStore":
        if directory.exists() and any(directory.iterdir()):
            raise UserError(f"{directory} exists and is not empty; use --resume or another --out")
        try:
            (directory / "cells").mkdir(parents=True, exist_ok=True)
            atomic_write(directory / "run.json", _json({"format": FORMAT_VERSION, **run}))
        except OSError as exc:
            raise UserError(f"cannot write the run directory {directory}: {exc}") from exc
        return cls(directory, {"format": FORMAT_VERSION, **run})

    @classmethod
    def open(cls, directory: Path) -> "RunStore":
        path = directory / "run.json"
        try:
            run = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{directory} is not a dynamem run (no run.json)") from None
        except ValueError as exc:
            raise UserError(f"{path} is corrupt: {exc}") from exc
        if not isinstance(run, dict) or run.get("format") != FORMAT_VERSION:
            found = run.get("format") if isinstance(run, dict) else None
            raise UserError(
                f"{path}: results format {found!r}; this dynamem reads {FORMAT_VERSION}"
            )
        missing = sorted(RUN_KEYS - set(run))
        if missing:
            raise UserError(f"{path} is corrupt: no {', '.join(missing)}")
        return cls(directory, run)

    def completed(self) -> set[str]:
        return {p.stem for p in self.cells_dir.glob("*.json")}

    def write_cell(
        self, cell_id: str, record: dict[str, Any], series: list[dict[str, Any]]
    ) -> None:
        """Series first, the cell's JSON last: the JSON's presence means complete."""
        try:
            for k, arrays in enumerate(series):
                if arrays:
                    buf = io.BytesIO()
                    np.savez_compressed(buf, **arrays)
                    atomic_write(self.cells_dir / f"{cell_id}.step{k}.npz", buf.getvalue())
            atomic_write(self.cells_dir / f"{cell_id}.json", _json(record))
        except OSError as exc:
            raise UserError(
                f"cannot write results for {cell_id}: {exc}; the cells written so far are kept "
                f"(then: dynamem run --resume {self.directory})"
            ) from exc

    def load_cells(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(valid cell records, problems): a record that fails to load is reported."""
        cells, problems = [], []
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                validate_cell(record, path.stem)
                cells.append(record)
            except (OSError, ValueError) as exc:
                problems.append(f"{path.name}: {exc}")
        return cells, problems

    def set_aside_invalid(self) -> list[str]:
        """Rename each cell record that fails validation to `<cell>.json.invalid` (kept as
        evidence), so the cell counts as not done and a resume runs it again; returns the
        problems, for the caller to report."""
        problems = []
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                validate_cell(json.loads(path.read_text()), path.stem)
            except (OSError, ValueError) as exc:
                problems.append(f"{path.name}: {exc}")
                os.replace(path, path.with_name(path.name + ".invalid"))
        return problems

    def load_series(self, cell_id: str, step: int) -> dict[str, np.ndarray]:
        with np.load(self.cells_dir / f"{cell_id}.step{step}.npz") as data:
            return {k: data[k] for k in data.files}
