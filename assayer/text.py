"""Small helpers for the lines that the commands print."""


def plural(count: int, noun: str) -> str:
    """Return `count` with `noun`, adding an s (es after ch) unless the count is one."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith("ch") else f"{count} {noun}s"
