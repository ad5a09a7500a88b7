"""The command line in-process, as the tests call it: exit status, stdout and stderr of `kdcache ARGV`."""
from kdcache.cli import main


def run(capsys, *argv):
    """Run `kdcache ARGV` in-process (arguments may be paths or numbers); return (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The one line a user error prints on stderr (fails when it is more, or a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
