"""Progress bars in a redirected log: a line now and then, not every redraw."""
import io
import sys

from megatron_t2i.progress import progress_bar


def _draws(stream: io.StringIO) -> int:
    return stream.getvalue().count("\r")


def test_a_redirected_bar_writes_its_first_and_last_state_only_within_the_interval(monkeypatch):
    log = io.StringIO()  # not a terminal: isatty() is False
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress_bar(range(500), desc="work", miniters=1):
        pass
    assert 1 <= _draws(log) <= 3 and "500/500" in log.getvalue()

    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(range(5), desc="work") as bar:  # on a terminal, tqdm's own redraw rate
        assert bar.mininterval == 0.1
    with progress_bar(range(5), desc="work", mininterval=2) as bar:  # a caller's choice stands
        assert bar.mininterval == 2
