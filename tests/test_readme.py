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


def test_readme_demo_and_hand_stage_numbers_agree():
    """The demo and the hand stages train the same teacher and students with the same options and
    seed (minutes, so not re-run here): the tables, student lines and teacher top-1 they show must
    be one run's, row for row."""
    def rows(text: str) -> dict:  # {(student, kind): (top1, agree)} of a summary table
        return {m.group(1, 2): m.group(3, 4) for m in re.finditer(r"^(\w+) +[\d,]+ (kd|baseline) +([\d.]+) +([\d.]+)$",
                                                                   text, re.M)}

    tables = [m.group(2) for m in blocks(readme(), "text") if "params kind" in m.group(2)]
    demo, hand = map(rows, tables)
    assert hand and all(hand[run] == demo[run] for run in hand)
    teacher = {re.search(r"^teacher +([\d.]+)$", text, re.M).group(1) for text in tables}
    assert teacher == {re.search(r"split test: .*teacher top-1 ([\d.]+)%", readme()).group(1)}
    finished = re.findall(r"^ +(\w+) +(kd|baseline)  top1 +([\d.]+)  \(", readme(), re.M)
    assert finished and all(top1 == demo[name, kind][0] for name, kind, top1 in finished)
