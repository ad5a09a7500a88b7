"""The README is short, links every page of docs/, and what it shows runs: its Python API example (with
fewer epochs and steps, twice in the same folder, as a user re-running it would) and its console sessions.
The docs pages' own sessions, the sh blocks' commands and the links are tests/test_docs.py's."""
import os
import re

from test_docs import DOCS, PAGES, ROOT, blocks, check_page, page_path

README = os.path.join(ROOT, "README.md")


def readme() -> str:
    return open(README).read()


def test_readme_is_at_most_250_lines():
    assert len(readme().splitlines()) <= 250


def test_readme_links_every_docs_page_and_contributing():
    linked = set(re.findall(r"\]\(((?:docs/[\w-]+|CONTRIBUTING)\.md)(?:#[\w-]*)?\)", readme()))
    assert linked == {f"docs/{p}" for p in PAGES} | {"CONTRIBUTING.md"}
    assert os.path.isdir(DOCS) and PAGES


def test_readme_python_api_example_runs_twice_in_the_same_folder(tmp_path, monkeypatch):
    block = blocks(readme(), "python")[0].group(2)
    for full, fast in [("epochs=8", "epochs=1"), ("for epoch in range(12):", "for epoch in range(1):"),
                       ("for x, y, index in loader:", "for _, (x, y, index) in zip(range(3), loader):")]:
        assert full in block, f"the README's Python example no longer has {full!r}; update this test"
        block = block.replace(full, fast)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # a second run finds the teacher trained and the cache there, and still works
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
    assert set(scope["parts"]) == {"loss", "task_loss", "kd_loss", "weight"}
    assert {"top1", "agreement"} <= set(scope["metrics"])
    assert os.path.exists(tmp_path / "runs/api/cache.zarr")
    assert not scope["teacher"].training


def test_readme_console_sessions_print_what_they_show(tmp_path, teacher_ckpt):
    assert blocks(open(page_path("README.md")).read(), "console")
    check_page("README.md", tmp_path, teacher_ckpt)
