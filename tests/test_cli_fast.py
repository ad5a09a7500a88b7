"""`kdcache --help` and `kdcache COMMAND --help` answer without importing torch (seconds saved on
every look at the options), and every option of every command shows its help and its default."""
import subprocess
import sys

PROBE = """
import sys
from kdcache.cli import cli, main
for argv in [["--help"]] + [[name, "--help"] for name in sorted(cli.commands)]:
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "numpy", "zarr", "h5py"))
print("HEAVY", ",".join(heavy[:5]))
"""


def test_help_of_every_command_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY", out.stdout[-500:]


def test_import_kdcache_is_lazy_and_still_gives_the_api():
    code = ("import sys, kdcache; assert 'torch' not in sys.modules, 'eager'; "
            "from kdcache import train_student, dump_teacher, open_cache, kd_objective, KDCacheError; "
            "assert 'torch' in sys.modules; print(kdcache.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_no_import_cycle_among_kdcache_modules():
    # every import, deferred ones included: a function-level import is no way around a cycle
    import ast
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kdcache")
    modules = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                name = os.path.relpath(os.path.join(folder, f), os.path.dirname(root))[:-3].replace(os.sep, ".")
                modules[name.removesuffix(".__init__")] = os.path.join(folder, f)
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                deps |= subs or ({node.module} & set(modules))
        graph[name] = deps - {name, "kdcache"}  # the lazy package __init__ imports nothing but version
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            assert state.get(d) != "open", " -> ".join(stack[stack.index(d):] + [d])
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_layering_contract_holds():
    # pyproject.toml's [tool.importlinter]: entry points > teacher | student sides > tools > core > store
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    linter = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    out = subprocess.run([linter], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0 and "1 kept, 0 broken" in out.stdout, out.stdout[-2000:]


def test_every_option_of_every_command_has_help_and_the_stages_show_their_defaults():
    from kdcache.cli import cli

    for name, command in cli.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"kdcache {name} {param.opts[0]} has no help"
    for name in ("dump-teacher", "train-student"):
        for param in cli.commands[name].params:
            if param.param_type_name == "option" and param.name != "config_file":
                assert "[default: " in param.help, (name, param.opts)


def test_help_lists_options_by_section():
    out = subprocess.run([sys.executable, "-c", "from kdcache.cli import main; main(['train-student', '--help'])"],
                         capture_output=True, text=True, timeout=120).stdout
    sections = [line for line in out.splitlines() if line.endswith("options:")]
    assert sections == ["Data options:", "Teacher options:", "Training options:", "KD options:", "Views options:",
                        "Run options:"], sections


def test_each_registry_implements_exactly_the_names_its_option_offers():
    from kdcache import augment, choices, encodings, hooks, losses, schedules

    assert set(losses.LOGIT_LOSSES) | {"nkd"} == set(choices.KD_LOSSES)
    assert set(losses.FEATURE_LOSSES) == set(choices.FEATURE_LOSSES) == set(losses.FEATURE_LOSS_FORMS)
    assert set(schedules.SCHEDULES) == set(choices.SCHEDULES)
    assert set(augment.PRESETS) == set(choices.AUGMENT_PRESETS)
    assert set(hooks.REDUCTIONS) == set(choices.ACTIVATION_FORMS)
    assert set(encodings.DTYPES) == set(choices.DTYPES) and encodings.INDEX_LAYOUTS == choices.INDEX_LAYOUTS
