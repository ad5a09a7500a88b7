"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into one line on stderr and exit status 2; library callers catch it as usual.
"""


class KDCacheError(Exception):
    """Bad user input: the message names the problem and the fix, in one line."""


def closest(name: str, choices, n: int = 5) -> str:
    """'did you mean' text for an unknown name: the closest valid names, comma separated."""
    import difflib

    choices = list(choices)
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not near:
        near = choices[:n]
    return ", ".join(near)
