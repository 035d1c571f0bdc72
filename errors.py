"""RunError: a problem the user can fix. Library code raises it with a message that says what was wrong and
what to do; only a script's main() turns it into the one-line error and exit code."""


class RunError(Exception):
    """A problem with the user's input or files; the message says what was wrong and what to do."""


def first_line(e):
    """'TypeName: first line of the message' (for wrapping low-level errors into one-line messages)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
