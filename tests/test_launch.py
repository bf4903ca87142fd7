"""The single-node launcher (megatron_t2i.cli.launch): torchrun's behaviour, with a failed rank or a
signal reported in one line and the exit code kept, instead of torchrun's traceback."""
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, tmp_path, **kwargs):
    entry = tmp_path / "entry.py"
    entry.write_text(script, encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "megatron_t2i.cli.launch", "--standalone",
                             "--nproc_per_node", "2", str(entry)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_a_failed_rank_is_one_line_with_its_exit_code(tmp_path):
    proc = launch("import os, sys\n"
                  "if os.environ['RANK'] == '1':\n"
                  "    sys.exit('entry.py: error: a bad flag')\n", tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "entry.py: error: a bad flag" in err
    assert "entry.py failed on rank 1 (exit code 1; its own message is above)" in err
    assert "Traceback" not in err


def test_an_interrupt_reaches_the_ranks_and_is_one_line(tmp_path):
    marks = tmp_path / "stopped"
    proc = launch("import os, signal, sys, time\n"
                  f"def stop(*_):\n"
                  f"    open({str(marks)!r} + os.environ['RANK'], 'w').close()\n"
                  "    sys.exit(0)\n"
                  "signal.signal(signal.SIGINT, stop)\n"
                  f"open({str(marks)!r} + 'ready' + os.environ['RANK'], 'w').close()\n"
                  "time.sleep(120)\n", tmp_path)
    deadline = time.time() + 60
    while not all(os.path.exists(f"{marks}ready{r}") for r in (0, 1)):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "launch: stopped by signal 2" in err
    assert "Traceback" not in err
    assert all(os.path.exists(f"{marks}{r}") for r in (0, 1))  # every rank was told
