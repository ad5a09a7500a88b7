"""The README's Python example runs as written (with fewer epochs and steps, to stay fast)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    block = block.replace("epochs=8", "epochs=1")
    block = block.replace("for x, y, index in loader:", "for _, (x, y, index) in zip(range(3), loader):")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert set(scope["parts"]) == {"loss", "task_loss", "kd_loss"}
    assert os.path.exists(tmp_path / "runs/api/cache.zarr")
