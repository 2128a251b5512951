"""What a demo run cost: wall and CPU seconds per stage.

On a shared machine wall time measures the other jobs too; CPU time (this process plus its finished worker
processes) is the demo's own cost. With the LoRA jobs spread over ``workers`` single-threaded processes and the
rest serial, an idle machine would take about serial + parallel / workers.
"""

from __future__ import annotations

import resource
import time


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


class StageClock:
    """Wall and CPU seconds of consecutive stages: ``mark(stage)`` closes the stage that ran since the last mark."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()

    def mark(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        self.wall[stage], self.cpu[stage] = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    def wall_seconds(self, stages: tuple[str, ...] | None = None) -> dict[str, float]:
        """Wall seconds of ``stages`` (default: all) and the total of all stages, to 0.1 s."""
        keep = self.wall if stages is None else {k: v for k, v in self.wall.items() if k in stages}
        return {**{k: round(v, 1) for k, v in keep.items()}, "total": round(sum(self.wall.values()), 1)}

    def cpu_summary(self, workers: int, parallel: str = "arms") -> dict[str, float]:
        """CPU seconds per stage, their total, and the wall time an idle machine would take with ``parallel``'s
        work spread over ``workers`` processes (``idle_wall_estimate``)."""
        stages = {k: round(v, 1) for k, v in self.cpu.items()}
        serial = sum(v for k, v in stages.items() if k != parallel)
        return {**stages, "total": round(sum(stages.values()), 1),
                "idle_wall_estimate": round(serial + stages.get(parallel, 0.0) / max(1, workers), 1)}


def done_line(summary: dict, workers: int | None = None, lead: str = "done in") -> str:
    """A demo's closing times from its summary: wall and CPU seconds (with ``workers``, the idle-cores estimate);
    after a resume (``summary["resumed"]``) they are this session's, the reused stages untimed: said."""
    wall, cpu = summary["timings_seconds"]["total"], summary["cpu_seconds"]
    session = " this session (resumed: the reused stages are not timed again)" if summary.get("resumed") else ""
    idle = f"; on {workers} idle cores about {cpu['idle_wall_estimate']:.0f} s" if workers else ""
    return f"{lead} {wall:.0f} s{session} ({cpu['total']:.0f} CPU-s{idle})"
