"""The raw results store: the truth every view (report, compare, asv) is made from.

Layout of `results/raw/<run-id>/`:

- `run.json`: a `dynamem.record.RunRecord` (`format`, `run_id`, `created`, `suite` (name
  and the TOML text), `seed`, `order` (cell ids in the order they run), `metadata`: host
  kernel and CPU, QEMU version, accelerator and why, guest kernel, image key and package
  pins, dynamem version and git commit).
- `cells/<cell-id>.json`: one `CellRecord` per finished cell, failed ones included.
- `cells/<cell-id>.step<k>.npz`: the time series of step k (numpy arrays; times on the
  host monotonic clock in ns; `t_request_ns` is the request).

The record types, their format history and the upgrade of older formats live in
`dynamem.record`; every format this dynamem has ever written loads. Every file is written
to a temporary name, fsynced and renamed, so a crash never leaves a half-written file; a
cell's JSON is written last and marks the cell complete. A cell JSON that fails validation
is reported; on resume it is set aside as `<cell>.json.invalid` and the cell runs again.
"""

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dynamem.errors import UserError
from dynamem.record import (
    FORMAT_VERSION,
    CellRecord,
    RunRecord,
    load_cell,
    load_run,
    to_json_data,
)

__all__ = ["FORMAT_VERSION", "RunStore", "atomic_write"]


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
    return (json.dumps(to_json_data(data), indent=1, sort_keys=True) + "\n").encode()


class RunStore:
    def __init__(self, directory: Path, run: RunRecord, raw_run: dict[str, Any]) -> None:
        self.directory = directory
        self.run = run
        self._raw_run = raw_run  # as on disk: older formats' cells are upgraded against it

    @property
    def cells_dir(self) -> Path:
        return self.directory / "cells"

    @property
    def format(self) -> int:
        return int(self._raw_run.get("format", FORMAT_VERSION))

    @classmethod
    def create(cls, directory: Path, run: RunRecord) -> "RunStore":
        if directory.exists() and any(directory.iterdir()):
            raise UserError(f"{directory} exists and is not empty; use --resume or another --out")
        try:
            (directory / "cells").mkdir(parents=True, exist_ok=True)
            atomic_write(directory / "run.json", _json(run))
        except OSError as exc:
            raise UserError(f"cannot write the run directory {directory}: {exc}") from exc
        return cls(directory, run, to_json_data(run))

    @classmethod
    def open(cls, directory: Path) -> "RunStore":
        path = directory / "run.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{directory} is not a dynamem run (no run.json)") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is corrupt: {exc}") from exc
        try:
            run = load_run(raw)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from exc
        return cls(directory, run, raw)

    def save_run(self) -> None:
        """Write run.json again after its metadata gained something (a check at the end)."""
        atomic_write(self.directory / "run.json", _json(self.run))
        self._raw_run = to_json_data(self.run)

    def completed(self) -> set[str]:
        return {p.stem for p in self.cells_dir.glob("*.json")}

    def write_cell(self, record: CellRecord) -> None:
        """Series first, the cell's JSON last: the JSON's presence means complete."""
        if self.format != FORMAT_VERSION:
            raise UserError(
                f"{self.directory} holds format {self.format} results; finish or rerun it with "
                f"the dynamem that wrote it (this one writes format {FORMAT_VERSION})"
            )
        try:
            for k, arrays in enumerate(record.series()):
                if arrays:
                    buf = io.BytesIO()
                    np.savez_compressed(buf, **arrays)
                    atomic_write(self.cells_dir / f"{record.cell}.step{k}.npz", buf.getvalue())
            atomic_write(self.cells_dir / f"{record.cell}.json", _json(record))
        except OSError as exc:
            raise UserError(
                f"cannot write results for {record.cell}: {exc}; the cells written so far are "
                f"kept (then: dynamem run --resume {self.directory})"
            ) from exc

    def _load(self, path: Path) -> CellRecord:
        record = load_cell(json.loads(path.read_text()), self._raw_run, path.stem)
        if record.cell != path.stem:
            raise ValueError(f"record of cell {record.cell!r} in the file of {path.stem!r}")
        return record

    def load_cells(self) -> tuple[list[CellRecord], list[str]]:
        """(valid cell records, problems): a record that fails to load is reported."""
        cells, problems = [], []
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                cells.append(self._load(path))
            except (OSError, ValueError) as exc:
                problems.append(f"{path.name}: {exc}")
        return cells, problems

    def load_all(self) -> tuple[list[CellRecord], list[str]]:
        """Every planned cell, for analysis: the readable records, plus a failed placeholder
        for each cell of the run's order that has none (never finished, or unreadable), so
        that every share counts it. A placeholder takes its condition and mechanism from
        another cell of its scenario; with none to take them from, it is a problem only
        (a `compare` still names the scenario as missing)."""
        cells, problems = self.load_cells()
        have = {c.cell for c in cells}
        unreadable = {p.split(":", 1)[0].removesuffix(".json") for p in problems}
        sibling = {c.scenario: c for c in cells}
        for cell_id in self.run.order:
            if cell_id in have:
                continue
            scenario, _, repeat = cell_id.rpartition("-r")
            why = "unreadable record" if cell_id in unreadable else "never finished"
            like = sibling.get(scenario)
            if like is None or not repeat.isdigit():
                problems.append(f"cell {cell_id}: {why}, and no cell of its scenario to count it")
                continue
            cells.append(
                CellRecord(
                    cell=cell_id,
                    scenario=scenario,
                    repeat=int(repeat),
                    mechanism=like.mechanism,
                    condition=like.condition,
                    status="failed",
                    failed_at=why,
                    error=f"{why}: no result for this cell",
                    reproduces=like.reproduces,
                )  # fmt: skip
            )
        return cells, problems

    def set_aside_invalid(self) -> list[str]:
        """Rename each cell record that fails validation to `<cell>.json.invalid` (kept as
        evidence), so the cell counts as not done and a resume runs it again; returns the
        problems, for the caller to report."""
        problems = []
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                self._load(path)
            except (OSError, ValueError) as exc:
                problems.append(f"{path.name}: {exc}")
                os.replace(path, path.with_name(path.name + ".invalid"))
        return problems

    def load_series(self, cell_id: str, step: int) -> dict[str, np.ndarray]:
        with np.load(self.cells_dir / f"{cell_id}.step{step}.npz") as data:
            return {k: data[k] for k in data.files}
