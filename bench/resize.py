"""asv benchmarks: what one memory resize costs, per mechanism, step size and workload.

Importing this module (asv's discovery) only parses a suite's TOML for the parameter grid.
Guests run in `setup_cache`, once per `asv run` for all benchmarks here (they share it):
it reads the raw run `dynamem nightly` just produced (DYNAMEM_ASV_RAW) or, when asv runs
alone, runs the suite (DYNAMEM_ASV_SUITE, default `nightly`) through dynamem's runner.
Every value comes from `dynamem.analysis.metrics` (see `dynamem.analysis.tracks`): the
median of the ok steps of ok cells, rounded to the metric's resolution; lower is better
for all of them except `OkSteps`, which says how many steps each median is of.

`version` is fixed so the timeline of nightlies survives edits to this file; bump it when
a benchmark starts measuring something else.
"""

from collections.abc import Callable
from typing import Any

from dynamem.analysis import tracks as _data

_GRID = _data.bench_grid()


def _titled(track: str) -> Callable[[Any], Any]:
    """asv reads pretty_name from the function, unit from the class."""

    def mark(func: Any) -> Any:
        func.pretty_name = _data.TRACKS[track].title
        return func

    return mark


class _Resize:
    params = _GRID.params
    param_names = _data.PARAM_NAMES
    timeout = _data.SETUP_TIMEOUT_S  # setup_cache may boot the whole suite
    version = "1"
    track = ""
    unit = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.track:
            cls.unit = _data.TRACKS[cls.track].unit

    def setup_cache(self) -> _data.Cache:
        return _data.load_cache()

    def value(self, cache: _data.Cache, mechanism: str, size: str, workload: str) -> float:
        return float(
            _data.track_value(cache, _GRID, _data.TRACKS[self.track], mechanism, size, workload)
        )


class ShrinkLatency(_Resize):
    track = "shrink_latency"

    @_titled(track)
    def track_shrink_latency(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """Guest-visible latency of a shrink: from the request until the guest sees it."""
        return self.value(cache, mechanism, size, workload)


class GrowLatency(_Resize):
    track = "grow_latency"

    @_titled(track)
    def track_grow_latency(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """Guest-visible latency of a grow: from the request until the guest sees it."""
        return self.value(cache, mechanism, size, workload)


class ShrinkRssChange(_Resize):
    track = "shrink_rss_change"

    @_titled(track)
    def track_shrink_rss_change(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """QEMU's RSS change after a shrink, in MiB: minus the host RSS reclaimed, so
        lower (more memory given back to the host) is better."""
        return self.value(cache, mechanism, size, workload)


class ShrinkSwapOut(_Resize):
    track = "shrink_swap_out"

    @_titled(track)
    def track_shrink_swap_out(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """Pages the guest swapped out during a shrink."""
        return self.value(cache, mechanism, size, workload)


class ShrinkPagesMigrated(_Resize):
    track = "shrink_pages_migrated"

    @_titled(track)
    def track_shrink_pages_migrated(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """Pages the guest migrated during a shrink (to empty the memory it gives up)."""
        return self.value(cache, mechanism, size, workload)


class ShrinkFragmentation(_Resize):
    track = "shrink_fragmentation"

    @_titled(track)
    def track_shrink_fragmentation(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """Change of the unusable free space index at order 9 (2 MiB) of the guest's
        main zone during a shrink; 0 is none, 1 is all free memory unusable."""
        return self.value(cache, mechanism, size, workload)


class ShrinkWatermark(_Resize):
    track = "shrink_watermark"

    @_titled(track)
    def track_shrink_watermark(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """Change of the guest zones' high watermarks during a shrink, summed (KiB).
        Either direction matters; asv flags only increases, so read the graph."""
        return self.value(cache, mechanism, size, workload)


class ShrinkWorkloadStall(_Resize):
    track = "shrink_workload_stall"

    @_titled(track)
    def track_shrink_workload_stall(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """The workload's longest stall during a shrink (the `impact` workload
        only: n/a for the others)."""
        return self.value(cache, mechanism, size, workload)


class OkSteps(_Resize):
    unit = "ok steps"

    def track_ok_steps_shrink(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """How many ok shrinks of ok cells the shrink values of this point are medians of
        (higher is better: read the graph, asv flags only increases)."""
        return float(_data.ok_steps(cache, _GRID, "shrink", mechanism, size, workload))

    track_ok_steps_shrink.pretty_name = "Ok shrinks behind each value"  # type: ignore[attr-defined]

    def track_ok_steps_grow(
        self, cache: _data.Cache, mechanism: str, size: str, workload: str
    ) -> float:
        """How many ok grows of ok cells the grow values of this point are medians of."""
        return float(_data.ok_steps(cache, _GRID, "grow", mechanism, size, workload))

    track_ok_steps_grow.pretty_name = "Ok grows behind each value"  # type: ignore[attr-defined]


class Failures(_Resize):
    version = "2"  # 1 counted cells; 2 counts resizes (failed cells' unreached ones included)
    params = _GRID.failure_params
    param_names = [_data.PARAM_NAMES[0], _data.PARAM_NAMES[2]]
    unit = "share of resizes"

    def track_failed_share(self, cache: _data.Cache, mechanism: str, workload: str) -> float:
        """Share of the resizes that were not ok steps of ok cells."""
        return float(_data.failure_share(cache, _GRID, mechanism, workload))

    track_failed_share.pretty_name = "Resizes not ok"  # type: ignore[attr-defined]
