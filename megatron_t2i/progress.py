"""Progress bars for long work: redrawn on a terminal, a line now and then in a redirected log."""
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar. On a terminal it redraws up to ten times a second; into a file or a pipe, where
    every redraw stays, it writes at most one update per LOG_INTERVAL_S seconds (and the last),
    each with its rate and ETA."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
