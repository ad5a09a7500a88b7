"""The README and docs/ say what this code does: every `console` block runs as written and prints what
it shows, every `sh` block's kdcache commands parse, docs/cli.md is the commands' own --help, and
every relative link resolves.

Fenced blocks (CONTRIBUTING.md, "Documentation"):
  ```console  a session that runs in seconds: `$ ` lines are commands (a trailing `\\` continues one),
              the lines up to the next `$ ` their output, stdout then stderr. A page's sessions run
              in order in one scratch folder, where runs/docs/teacher is the `teacher_ckpt` fixture
              (DOCS_TEACHER below trains the same teacher). Outputs are compared after NORMALISED:
              timings, dates, hashes and progress lines (which depend on the clock) are masked.
  ```sh       commands that take minutes or need a server or GPUs: not run here; every kdcache
              command in them must parse (its options exist and take the values given).

Regenerate the shown outputs and docs/cli.md after a change: `.venv/bin/python tests/test_docs.py`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(f for f in os.listdir(DOCS) if f.endswith(".md")) if os.path.isdir(DOCS) else []
# The teacher the docs' examples start from, exactly conftest's teacher_ckpt (cnn_small, 4 epochs on digits)
DOCS_TEACHER = ".venv/bin/kdcache train-student --student cnn_small --dataset digits --epochs 4 --out runs/docs/teacher"
TEACHER_DIR = "runs/docs/teacher/cnn_small"
THREADS = 2  # conftest's torch thread count: the shown outputs are those of 2 threads

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.S | re.M)
MASKS = [  # (pattern, what it stands for): what changes from run to run, or machine to machine
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[+-]\d\d:\d\d|Z)?"), "<date>"),
    (re.compile(r"\b[0-9a-f]{12,64}\b"), "<hash>"),
    (re.compile(r"(?<![\w.])\d+(?:\.\d+)?s\b"), "<seconds>"),
    (re.compile(r"(?<![\w.])\d+m\d\ds\b"), "<seconds>"),
    (re.compile(r"/[\w./+-]*?/(?=runs/)"), "<folder>/"),  # an absolute path to the folder the commands run in
]
SHOWN_FOLDER = "/home/you/kdcache"  # that folder, as the pages show it
PROGRESS = re.compile(r": [\d,]+/[\d,]+ \w+ \(\d+%\)")  # a Progress line, printed every few seconds off a terminal


# --- reading the pages ---------------------------------------------------------------------------

def page_path(page: str) -> str:
    return os.path.join(ROOT, page) if page in ("README.md", "CONTRIBUTING.md") else os.path.join(DOCS, page)


def blocks(text: str, info: str) -> list[re.Match]:
    return [m for m in FENCE.finditer(text) if m.group(1) == info]


def session(body: str) -> list[tuple[list[str], list[str]]]:
    """[(command lines, output lines)] of a console block."""
    steps = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ "), f"a console block's output belongs to a command: {lines[i]!r}"
        command = [lines[i]]
        while command[-1].endswith("\\"):
            i += 1
            command.append(lines[i])
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        steps.append((command, output))
    return steps


def argv_of(command: list[str]) -> list[str]:
    text = " ".join(line.rstrip("\\").strip() for line in command)
    return shlex.split(text[2:] if text.startswith("$ ") else text, comments=True)


def normalised(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if PROGRESS.search(line):
            continue
        for pattern, mask in MASKS:
            line = pattern.sub(mask, line)
        out.append(line.rstrip())
    while out and not out[-1]:
        out.pop()
    return out


def expected_status(output: list[str]) -> int:
    """2 for a one-line error, 1 for `kdcache verify`'s problems, else 0."""
    if any(re.match(r"kdcache( [\w-]+)?: error: ", line) for line in output):
        return 2
    if any(line.startswith("problem: ") for line in output):
        return 1
    return 0


# --- running them ---------------------------------------------------------------------------------

def run(argv: list[str]) -> tuple[int, list[str]]:
    """(exit status, output lines) of one shell command run in the current folder: kdcache in-process
    (as the installed `kdcache` runs it), anything else (rm, cp) by bash."""
    if argv[0] in ("kdcache", ".venv/bin/kdcache"):
        from kdcache.cli import main

        out, err = io.StringIO(), io.StringIO()
        kdcache_log = logging.getLogger("kdcache")
        level = kdcache_log.level
        kdcache_log.setLevel(logging.INFO)  # as in a fresh process, whatever an earlier test set
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(argv[1:])
        except SystemExit as e:
            code = e.code or 0
        finally:
            kdcache_log.setLevel(level)
        return code, (out.getvalue() + err.getvalue()).splitlines()
    done = subprocess.run(shlex.join(argv), shell=True, capture_output=True, text=True, executable="/bin/bash")
    return done.returncode, (done.stdout + done.stderr).splitlines()


def prepare(folder: str, teacher_ckpt: str) -> None:
    """A scratch folder in which the docs' teacher is already trained (the teacher_ckpt fixture)."""
    shutil.copytree(os.path.dirname(teacher_ckpt), os.path.join(folder, TEACHER_DIR))


def run_page(page: str, folder: str, teacher_ckpt: str) -> list[tuple[str, list[str], list[str], int]]:
    """Run every console session of `page` in `folder`: [(command, shown, printed, status)]."""
    text = open(page_path(page)).read()
    prepare(folder, teacher_ckpt)
    results = []
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for block in blocks(text, "console"):
            for command, shown in session(block.group(2)):
                code, printed = run(argv_of(command))
                printed = [line.replace(os.path.realpath(folder), SHOWN_FOLDER).replace(folder, SHOWN_FOLDER)
                           for line in printed]
                results.append(("\n".join(command), shown, printed, code))
    finally:
        os.chdir(cwd)
    return results


def check_page(page: str, folder, teacher_ckpt: str) -> None:
    for command, shown, printed, code in run_page(page, str(folder), teacher_ckpt):
        assert normalised(printed) == normalised(shown), f"{page}: {command}\nprinted:\n" + "\n".join(printed)
        assert code == expected_status(shown), f"{page}: {command} exited {code}\n" + "\n".join(printed)


def parse_sh_commands(page: str) -> list[str]:
    """Parse every kdcache command of the page's sh blocks with the CLI's own parser; return them."""
    import click

    from kdcache.cli import cli

    checked = []
    for block in blocks(open(page_path(page)).read(), "sh"):
        lines = block.group(2).splitlines()
        while lines:
            command = [lines.pop(0)]
            while command[-1].rstrip().endswith("\\"):
                command.append(lines.pop(0))
            argv = argv_of(command)
            if "kdcache" in [os.path.basename(a) for a in argv[:1]]:
                args = argv[1:]
            elif "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["kdcache"]:
                args = argv[argv.index("-m") + 2:]  # torchrun ... -m kdcache ARGS, python -m kdcache ARGS
            else:
                continue
            sub = cli.get_command(None, args[0]) if args else None
            assert sub is not None, f"{page}: {' '.join(command)}: no such kdcache command"
            try:  # under the group's context, as `kdcache` parses it (click caches each command's help option)
                with cli.make_context("kdcache", [args[0]]) as parent:
                    sub.make_context(args[0], list(args[1:]), parent=parent).close()
            except click.ClickException as e:
                raise AssertionError(f"{page}: {' '.join(command)}: {e.format_message()}") from None
            checked.append(" ".join(args))
    return checked


# --- docs/cli.md is the --help of every command ------------------------------------------------------

CLI_BEGIN = "<!-- generated from `kdcache COMMAND --help` by tests/test_docs.py: do not edit below -->"


def help_of(command: list[str]) -> str:
    from click.testing import CliRunner

    from kdcache.cli import cli

    result = CliRunner().invoke(cli, [*command, "--help"], prog_name="kdcache", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def cli_reference() -> str:
    from kdcache.cli import cli

    parts = [CLI_BEGIN, "", "```text", help_of([]).rstrip(), "```"]
    for name in cli.list_commands(None):
        parts += ["", f"### kdcache {name}", "", "```text", help_of([name]).rstrip(), "```"]
    return "\n".join(parts) + "\n"


def cli_page() -> tuple[str, str]:
    text = open(os.path.join(DOCS, "cli.md")).read()
    assert CLI_BEGIN in text, "docs/cli.md lost its generated part's marker"
    head, generated = text.split(CLI_BEGIN)
    return head, CLI_BEGIN + generated


# --- links ---------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.*)$", FENCE.sub("", text), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def broken_links(page: str) -> list[str]:
    path = page_path(page)
    text = FENCE.sub("", open(path).read())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        where = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(where):
            broken.append(target)
        elif anchor and where.endswith(".md") and anchor not in anchors(open(where).read()):
            broken.append(target)
    return broken


# --- the tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", [p for p in PAGES if blocks(open(page_path(p)).read(), "console")])
def test_console_sessions_of_docs_page_print_what_they_show(page, tmp_path, teacher_ckpt):
    if torch.get_num_threads() != THREADS:  # KDCACHE_TEST_THREADS: other threads sum in another order
        pytest.skip(f"the shown outputs are those of {THREADS} torch threads, and this run has {torch.get_num_threads()}")
    check_page(page, tmp_path, teacher_ckpt)


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", *PAGES])
def test_sh_commands_parse_and_links_resolve(page):
    parse_sh_commands(page)
    assert broken_links(page) == []


def test_docs_teacher_is_the_teacher_ckpt_fixture_and_is_shown():
    text = "\n".join(open(page_path(p)).read() for p in ["README.md", *PAGES])
    assert DOCS_TEACHER in text
    assert "runs/docs/teacher" in open(os.path.join(ROOT, "README.md")).read()
    conftest = open(os.path.join(ROOT, "tests", "conftest.py")).read()
    assert 'train_student(students=["cnn_small"], dataset="digits", epochs=4' in conftest


def test_cli_page_is_every_commands_help():
    assert cli_page()[1] == cli_reference(), "docs/cli.md is stale: run .venv/bin/python tests/test_docs.py"


def test_no_two_pages_write_into_the_same_runs_folder():
    """Each page's commands write under its own runs/<folder> (runs/docs/teacher is read by all)."""
    owners: dict = {}
    for page in ["README.md", *PAGES]:
        for folder in set(re.findall(r"--out[ =](?:runs/)([\w-]+)", open(page_path(page)).read())):
            owners.setdefault(folder, set()).add(page)
    shared = {f: p for f, p in owners.items() if len(p) > 1 and f != "docs"}
    assert shared == {}


def test_make_demo_deletes_only_what_its_own_pipeline_writes():
    """`make demo` starts afresh by deleting its folder: no other pipeline or page writes there."""
    make = open(os.path.join(ROOT, "Makefile")).read()
    demos = re.findall(r"rm -rf (runs/[\w-]+)\n\t\$\(BIN\)/kdcache run (pipelines/[\w.-]+)", make)
    assert len(demos) >= 2, "the Makefile's demo recipes changed; update this test"
    folder = os.path.join(ROOT, "pipelines")
    outs = {f"pipelines/{f}": re.findall(r"^\s+out: (\S+)", open(os.path.join(folder, f)).read(), re.M)
            for f in os.listdir(folder) if f.endswith(".yaml")}
    for deleted, own in demos:
        assert outs[own] and all(out.startswith(deleted + "/") for out in outs[own])
        for pipeline, written in outs.items():
            assert pipeline == own or not any(out.startswith(deleted + "/") for out in written), pipeline
        for page in ["README.md", *PAGES]:
            assert not re.search(rf"--out[ =]{deleted}/", open(page_path(page)).read()), page


def test_architecture_page_names_every_module():
    text = open(os.path.join(DOCS, "architecture.md")).read()
    package = os.path.join(ROOT, "kdcache")
    missing = [os.path.relpath(os.path.join(folder, f), package)
               for folder, _, files in os.walk(package) for f in files
               if f.endswith(".py") and f not in ("__init__.py", "__main__.py") and f"`{f}`" not in text]
    assert missing == [], "docs/architecture.md does not say what these modules are for"


def test_masks_hide_what_changes_between_runs_and_nothing_else():
    shown = ["cnn_tiny kd epoch 1/2: loss 1.2 top1  52.78  24.2s", "       cnn_tiny  kd  top1  96.39  (4.1s)",
             "store x (created 2026-11-30T09:22:04+00:00)", "weights sha256 4cd7b65082c920dd",
             "resnet20 plain epoch 1/8: 256/1,437 samples (18%), 23 samples/s, ETA 51s"]
    printed = ["cnn_tiny kd epoch 1/2: loss 1.2 top1  52.78  3.0s", "       cnn_tiny  kd  top1  96.39  (11.9s)",
               "store x (created 2027-01-01T00:00:00+00:00)", "weights sha256 02f51730aaceb2b3"]
    assert normalised(printed) == normalised(shown)
    assert normalised(["top1  96.39"]) != normalised(["top1  96.67"])
    assert normalised(["6,725 B on disk"]) != normalised(["6,726 B on disk"])


# --- regeneration ------------------------------------------------------------------------------------

def regenerate(pages: list[str]) -> None:
    """Rewrite docs/cli.md's generated part and the output of every console session, from this code."""
    import tempfile

    import torch

    torch.set_num_threads(THREADS)
    head, _ = cli_page()
    with open(os.path.join(DOCS, "cli.md"), "w") as f:
        f.write(head + cli_reference())
    pages = [p for p in pages if blocks(open(page_path(p)).read(), "console")]
    with tempfile.TemporaryDirectory() as scratch:
        from kdcache import train_student

        if pages:  # conftest's teacher_ckpt, made the same way
            train_student(students=["cnn_small"], dataset="digits", epochs=4, out=os.path.join(scratch, "teacher"))
        teacher = os.path.join(scratch, "teacher", "cnn_small", "model.pt")
        for page in pages:
            path = page_path(page)
            text = open(path).read()
            folder = tempfile.mkdtemp(dir=scratch)
            results = iter(run_page(page, folder, teacher))
            pieces, end = [], 0
            for block in blocks(text, "console"):
                lines = []
                for command, _ in session(block.group(2)):
                    _, _, printed, code = next(results)
                    lines += command + [line.rstrip() for line in printed if not PROGRESS.search(line)]
                pieces += [text[end:block.start(2)], "\n".join(lines) + "\n"]
                end = block.end(2)
            with open(path, "w") as f:
                f.write("".join(pieces) + text[end:])
            print(f"rewrote {page}")


if __name__ == "__main__":
    regenerate(sys.argv[1:] or ["README.md", *PAGES])
