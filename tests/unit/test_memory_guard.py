"""--max-rss: the guard sheds past the limit and resumes only when the tier fits again."""

from __future__ import annotations

from promptcache.cache.resident import MemoryGuard, memory_split, rss_parts

MB = 1 << 20


class World:
    """A fake process: RSS that shedding lowers by ``released``, and a clock."""

    def __init__(self, rss: int, released: int) -> None:
        self.rss, self.released, self.now = rss, released, 0.0
        self.calls: list[str] = []

    async def shed(self) -> None:
        self.calls.append("shed")
        self.rss -= self.released

    async def resume(self) -> None:
        self.calls.append("resume")
        self.rss += self.released


def guard_for(world: World, limit: int = 200 * MB) -> MemoryGuard:
    return MemoryGuard(limit, shed=world.shed, resume=world.resume, hold=5.0,
                       rss=lambda: world.rss, clock=lambda: world.now)


async def test_under_the_limit_nothing_happens() -> None:
    world = World(150 * MB, 100 * MB)
    guard = guard_for(world)
    await guard.check()
    assert world.calls == [] and guard.stats()["shedding"] is False and guard.sheds == 0


async def test_past_the_limit_it_sheds_once_and_remembers_what_that_released() -> None:
    world = World(210 * MB, 100 * MB)
    guard = guard_for(world)
    await guard.check()
    await guard.check()
    assert world.calls == ["shed"] and guard.sheds == 1 and guard.released == 100 * MB
    stats = guard.stats()
    assert stats["shedding"] is True and stats["max_rss_bytes"] == 200 * MB
    assert stats["peak_rss_bytes"] == 210 * MB


async def test_it_resumes_only_when_the_tier_would_fit_under_nine_tenths_after_the_hold() -> None:
    world = World(210 * MB, 100 * MB)
    guard = guard_for(world)
    await guard.check()  # shed: 110 MB now; reloading would bring back 100 MB
    world.now = 10.0
    await guard.check()
    assert world.calls == ["shed"], "110 + 100 MB is over 180 MB: it must not flap back"
    world.rss = 75 * MB  # traffic's memory went back (memos, buffers)
    world.now = 12.0
    await guard.check()
    assert world.calls == ["shed", "resume"] and guard.stats()["shedding"] is False
    assert guard.stats()["shed_seconds"] == 12.0


async def test_it_holds_the_shed_state_at_least_the_hold_time() -> None:
    world = World(210 * MB, 100 * MB)
    guard = guard_for(world)
    await guard.check()
    world.rss = 20 * MB  # well under: only the hold keeps it shed
    world.now = 4.9
    await guard.check()
    assert world.calls == ["shed"]
    world.now = 5.0
    await guard.check()
    assert world.calls == ["shed", "resume"]
    assert guard.stats()["shed_seconds"] == 5.0


async def test_a_failing_resume_leaves_it_shed_and_tries_again() -> None:
    world = World(210 * MB, 150 * MB)
    guard = guard_for(world)
    failures = [RuntimeError("model file gone")]

    async def resume() -> None:
        if failures:
            raise failures.pop()
        await world.resume()

    guard._resume = resume
    await guard.check()
    world.rss = 20 * MB
    world.now = 6.0
    try:
        await guard.check()
    except RuntimeError:
        pass
    assert guard.stats()["shedding"] is True
    await guard.check()
    assert guard.stats()["shedding"] is False and world.calls == ["shed", "resume"]


def test_the_memory_report_splits_rss_into_named_parts_and_the_rest() -> None:
    parts = rss_parts()
    assert parts["rss_bytes"] > 0 and parts["anon_bytes"] > 0
    report = memory_split(model=1000, index=24)
    assert report["model_bytes"] == 1000 and report["index_bytes"] == 24
    assert report["rss_bytes"] == 1024 + report["other_bytes"]
