"""A training run killed in a given epoch: kdcache.train.evaluate raises at that epoch's call, after
its steps, so the run's last.pt holds the epochs before it (as a kill there would leave it)."""
import kdcache.train as train_mod


def kill_in_epoch(monkeypatch, epoch: int):
    """Make training raise RuntimeError("killed") when epoch `epoch` (1-based) evaluates; return a
    function that undoes it, for the run that resumes."""
    real, calls = train_mod.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    return lambda: monkeypatch.setattr(train_mod, "evaluate", real)
