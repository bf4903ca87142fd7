"""Generation I/O: safe names from free text, never overwriting, atomic writes, grids, query
sources (file, --with-id, interactive) and the broadcast of queries to other ranks."""
import io as pyio
import os

import pytest
from PIL import Image

from distributed import run_distributed
from megatron_t2i.generation import io

IMAGE = Image.new("RGB", (8, 8), (200, 10, 10))


@pytest.mark.parametrize("text,expected", [
    ("a red circle", "a_red_circle"),
    ("../../etc/x", "etc_x"),
    ("/abs/path\\win", "abs_path_win"),
    ("tab\there\nnew\x00nul\x1besc", "tab_here_new_nul_esc"),
    ("...", "query"),
    ("", "query"),
    ("一只红色的圆", "一只红色的圆"),
    ("ＦＵＬＬ width", "FULL_width"),
])
def test_safe_name(text, expected):
    assert io.safe_name(text) == expected


def test_safe_name_is_bounded_in_bytes_and_keeps_whole_characters():
    name = io.safe_name("圆" * 100, max_bytes=50)
    assert len(name.encode()) <= 50 and name == "圆" * 16


def test_hostile_queries_stay_inside_the_output_folder(tmp_path):
    out = tmp_path / "out"
    for text in ("../../etc/x", "/etc/passwd", "..", "a/../../b", "~root"):
        for path in io.save_samples([IMAGE], str(out), None, text):
            real = os.path.realpath(path)
            assert real.startswith(str(out) + os.sep), (text, path)
        for path in io.save_samples([IMAGE], str(out), text, "caption"):  # hostile ids too
            assert os.path.realpath(path).startswith(str(out) + os.sep)
    assert not (tmp_path / "etc").exists()


def test_never_overwrites_and_leaves_no_temporary_files(tmp_path):
    first = io.save_image(IMAGE, str(tmp_path / "x.png"))
    second = io.save_image(Image.new("RGB", (8, 8)), str(tmp_path / "x.png"))
    third = io.save_image(IMAGE, str(tmp_path / "x.png"))
    assert [os.path.basename(p) for p in (first, second, third)] == ["x.png", "x-1.png", "x-2.png"]
    assert Image.open(first).getpixel((0, 0)) == (200, 10, 10)  # the first file is untouched
    assert sorted(os.listdir(tmp_path)) == ["x-1.png", "x-2.png", "x.png"]


def test_with_id_and_debug_layouts(tmp_path):
    images = [IMAGE] * 3
    paths = io.save_samples(images, str(tmp_path), "q7", "a red circle")
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["q7/000.png", "q7/001.png", "q7/002.png"]
    paths = io.save_samples(images, str(tmp_path), None, "a red circle")
    assert os.path.relpath(paths[0], tmp_path) == os.path.join("a_red_circle", "000.png")
    grid, = io.save_samples(images, str(tmp_path), None, "a red circle", debug=True, nrow=2)
    name = os.path.basename(grid)
    assert os.path.dirname(grid) == str(tmp_path) and name.startswith("a_red_circle-")
    assert Image.open(grid).size == (2 * 10 + 2, 2 * 10 + 2)  # 2 x 2 cells of 8 px + padding 2
    again, = io.save_samples(images, str(tmp_path), None, "a red circle", debug=True, nrow=2)
    assert again != grid  # same second: suffixed, not overwritten
    grid_id, = io.save_samples(images, str(tmp_path), "q7", "a red circle", debug=True)
    assert os.path.dirname(grid_id) == str(tmp_path / "q7")


def test_grid_places_every_image():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = io.make_grid([Image.new("RGB", (4, 4), c) for c in colours], nrow=2, padding=1)
    assert grid.size == (2 * 5 + 1, 2 * 5 + 1)
    assert [grid.getpixel(xy) for xy in ((1, 1), (6, 1), (1, 6), (6, 6))] == \
        colours + [(255, 255, 255)]


def test_file_queries_with_id_skip_bad_lines(tmp_path):
    source = tmp_path / "queries.txt"
    source.write_text("q1\ta red circle\n\nno tab here\nq3\t一只猫\r\n", encoding="utf-8")
    log = pyio.StringIO()
    queries = list(io.parse_queries(io.read_lines(str(source)), str(source), True, str.upper, log))
    assert [(q.index, q.id, q.text, q.item) for q in queries] == [
        (0, "q1", "a red circle", "A RED CIRCLE"), (1, "q3", "一只猫", "一只猫")]
    assert log.getvalue().strip() == f"skipped line 3 of {source}: expected id<TAB>query (--with-id)"


def test_missing_or_binary_query_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input-source .*nope.txt: no such file"):
        list(io.read_lines(str(tmp_path / "nope.txt")))
    (tmp_path / "mixed").write_bytes(b"\xff\xfe\x00bad\na red circle\n\xc3(\nblue\n")
    log = pyio.StringIO()
    assert list(io.read_lines(str(tmp_path / "mixed"), log=log)) == [(2, "a red circle"),
                                                                      (4, "blue")]
    assert log.getvalue().splitlines() == [
        f"skipped line 1 of {tmp_path / 'mixed'}: not UTF-8 text (byte 0xff at position 0; "
        f"1 such line(s) so far)",
        f"skipped line 3 of {tmp_path / 'mixed'}: not UTF-8 text (byte 0xc3 at position 0; "
        f"2 such line(s) so far)"]


def test_interactive_skips_a_line_that_is_not_utf8_and_answers_the_next():
    class Stdin:  # a terminal's stdin: text on top of raw bytes
        buffer = pyio.BytesIO(b"\xff\xfeold latin-1 caf\xe9\na red circle\nstop\n")
    out, log = pyio.StringIO(), pyio.StringIO()
    assert list(io.read_lines("interactive", Stdin(), out, log)) == [(2, "a red circle")]
    assert "skipped line 1 of interactive input (stdin): not UTF-8" in log.getvalue()
    assert out.getvalue().count(io.PROMPT) == 3


def test_interactive_reads_until_stop_or_end():
    out = pyio.StringIO()
    lines = list(io.read_lines("interactive", pyio.StringIO("a red circle\n\n  \nblue\nstop\nnever\n"),
                               out))
    assert [text for _, text in lines] == ["a red circle", "blue"]
    assert out.getvalue().count(io.PROMPT) == 5
    assert [t for _, t in io.read_lines("interactive", pyio.StringIO("last"), out)] == ["last"]


def _receive(rank, world_size, lines):
    queries = io.parse_queries(iter(enumerate(lines, 1)), "test", False, len) if rank == 0 else None
    return [(q.index, q.text, q.item) for q in io.broadcast_queries(queries)]


@pytest.mark.slow
def test_queries_reach_every_rank():
    lines = ["a red circle", "一只猫", "x" * 500]
    expected = [(i, text, len(text)) for i, text in enumerate(lines)]
    assert run_distributed(_receive, 2, lines) == [expected, expected]
