"""One writer per store, even when several processes find the same stale lock at the same moment."""
import json
import multiprocessing
import os
import socket

import pytest

from kdcache.errors import KDCacheError
from kdcache.store import lock as lock_mod

RACERS = 4  # processes that find one stale lock together

fork = multiprocessing.get_context("fork")  # the racers inherit this module: nothing to import, nothing to pickle


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a killed dump leaves in its lock."""
    p = fork.Process(target=int)
    p.start()
    p.join()
    return p.pid


def race(store: str, stale_pid: int, start, done, results, together: bool) -> None:
    """One racer: try to take the lock, report won / refused / crashed, hold it until every racer has
    reported, then let go. `together`: every racer has judged the lock stale before any acts on it
    (the hostile interleaving, forced by a barrier inside the liveness check, not by timing)."""
    real_alive = lock_mod._alive
    first = [True]

    def alive_after_everyone_looked(pid):
        if pid == stale_pid and first[0]:
            first[0] = False
            start.wait(timeout=60)
        return real_alive(pid)

    if together:
        lock_mod._alive = alive_after_everyone_looked
    else:
        start.wait(timeout=60)
    held = lock_mod.StoreLock(store)
    try:
        held.acquire()
        results.put("won")
    except KDCacheError as e:
        results.put("refused" if "another dump" in str(e) else f"error: {e}")
    except BaseException as e:  # noqa: BLE001  a crash is a result too: the test names it
        results.put(f"crashed: {type(e).__name__}: {e}")
    done.wait(timeout=60)  # nobody lets go before everyone has tried
    held.release()


def run_race(tmp_path, rounds: int, together: bool) -> list:
    """`rounds` races of RACERS processes on one stale lock; each round's sorted results."""
    store = str(tmp_path / "c.zarr")
    outcomes = []
    for _ in range(rounds):
        with open(store + ".lock", "w") as f:
            json.dump({"pid": dead_pid(), "host": socket.gethostname()}, f)
        stale_pid = json.load(open(store + ".lock"))["pid"]
        start, done, results = fork.Barrier(RACERS), fork.Barrier(RACERS), fork.Queue()
        racers = [fork.Process(target=race, args=(store, stale_pid, start, done, results, together))
                  for _ in range(RACERS)]
        for p in racers:
            p.start()
        got = sorted(results.get(timeout=60) for _ in racers)
        for p in racers:
            p.join(timeout=60)
        outcomes.append(got)
        assert not os.path.exists(store + ".lock"), got  # the winner let go, and nobody left a lock behind
    return outcomes


def test_racers_that_all_judged_one_lock_stale_take_it_over_exactly_once(tmp_path):
    for got in run_race(tmp_path, rounds=5, together=True):
        assert got == ["refused"] * (RACERS - 1) + ["won"], got


def test_racers_started_together_on_a_stale_lock_give_one_winner_every_time(tmp_path):
    for got in run_race(tmp_path, rounds=20, together=False):
        assert got == ["refused"] * (RACERS - 1) + ["won"], got


def test_a_lock_naming_a_live_process_is_never_taken_over(tmp_path):
    store = str(tmp_path / "c.zarr")
    with open(store + ".lock", "w") as f:
        json.dump({"pid": os.getppid(), "host": socket.gethostname()}, f)  # pytest's parent: alive
    with pytest.raises(KDCacheError, match=f"another dump \\(pid {os.getppid()} "):
        lock_mod.StoreLock(store).acquire()
    assert json.load(open(store + ".lock"))["pid"] == os.getppid()


@pytest.mark.parametrize("content", ["", "{", "[1, 2]", '{"pid": "x", "host": "h"}', '{"pid": -1}'])
def test_a_lock_being_written_or_garbled_counts_as_held(tmp_path, content):
    store = str(tmp_path / "c.zarr")
    with open(store + ".lock", "w") as f:
        f.write(content)
    with pytest.raises(KDCacheError, match="another dump"):
        lock_mod.StoreLock(store).acquire()
    assert open(store + ".lock").read() == content
