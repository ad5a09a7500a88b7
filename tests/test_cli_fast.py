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
