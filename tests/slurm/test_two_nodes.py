"""examples/slurm/train.sbatch on two SLURM nodes, for real: examples/slurm/two_node_cluster.sh stands up munge,
a slurmctld and two slurmd (node1, node2), each slurmd in a network namespace of its own joined to the host by
a veth pair on a bridge. The tiny config is submitted with `sbatch --nodes=2` (one process per node at TP1, so
DP2 across the nodes over gloo): an uninterrupted run, and a run that gets the time-limit warning (SIGUSR1 to
the batch shell), saves, requeues itself, resumes and must end with exactly the uninterrupted run's losses.

Checked beyond the log lines: while each attempt trains, the test finds the worker processes in /proc and
requires rank 0 inside node1's network namespace and rank 1 inside node2's (SLURMD_NODENAME, the namespace
inode), with TCP connections to the other node's address (the only non-loopback address either namespace has:
the rendezvous store and gloo go over the veth pairs), and the resumed attempt's workers carrying
SLURM_RESTART_COUNT=1.

Skipped (reason printed with `pytest -rs`) unless root, with slurm-wlm + munge + iproute2 installed and
network namespaces available; MLLM_MEGA_SLURM_TEST=0 skips it too. The cluster is brought up (a running one
is reused) and is always torn down afterwards (MLLM_MEGA_TWO_NODE_KEEP=1 keeps it). Its slurm.conf is not
/etc/slurm/slurm.conf: only clients given SLURM_CONF see it, so test_slurm.py (which looks for the machine's
default cluster with a bare `sinfo`) neither sees it nor submits to it.

Test aid (as in test_slurm.py): SLURM holds a requeued job ~2 minutes before it is eligible again; once it is
pending and both nodes have finished completing the old allocation, the test sets its start time to now.
"""
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

CLUSTER = os.path.join(ROOT, "examples", "slurm", "two_node_cluster.sh")
SCRIPT = os.path.join(ROOT, "examples", "slurm", "train.sbatch")
CONFIG = "examples/configs/tiny_synthetic.yaml"
STATE_DIR = os.environ.get("MLLM_MEGA_TWO_NODE_STATE", "/tmp/mllm_mega_slurm2")
NODES = {"node1": "10.77.0.11", "node2": "10.77.0.12"}   # two_node_cluster.sh's default NET_PREFIX
STEPS = 8
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE")


def _unavailable() -> str:
    """Why the two-node test cannot run here ('' when it can); cheap checks first (CI: no slurm)."""
    if os.environ.get("MLLM_MEGA_SLURM_TEST") == "0":
        return "MLLM_MEGA_SLURM_TEST=0"
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    missing = [b for b in ("sbatch", "slurmctld", "slurmd", "munged", "ip", "nsenter", "unshare")
               if not shutil.which(b)]
    if missing:
        return f"no {', '.join(missing)} (apt-get install slurm-wlm munge iproute2)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links)"
    res = subprocess.run(["bash", CLUSTER, "check"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "STATE_DIR": STATE_DIR})
    return "" if res.returncode == 0 else f"two_node_cluster.sh check: {res.stdout.strip() or res.stderr.strip()}"


_WHY = _unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_WHY), reason=f"two-node SLURM test skipped: {_WHY}")]


def _cluster_cmd(action, timeout=180):
    return subprocess.run(["bash", CLUSTER, action], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "STATE_DIR": STATE_DIR})


def _read(path):
    return open(path).read() if os.path.isfile(path) else ""


@pytest.fixture(scope="module")
def cluster():
    res = _cluster_cmd("up")
    assert res.returncode == 0, f"two_node_cluster.sh up failed:\n{res.stdout}\n{res.stderr}"
    env = {**os.environ, "SLURM_CONF": os.path.join(STATE_DIR, "slurm.conf")}
    try:
        yield env
    finally:
        if os.environ.get("MLLM_MEGA_TWO_NODE_KEEP") != "1":
            for log in ("slurmctld", "slurmd-node1", "slurmd-node2"):   # for a failed run's report
                print(f"--- {log}.log (last lines)\n" + _read(os.path.join(STATE_DIR, "log", f"{log}.log"))[-1500:])
            down = _cluster_cmd("down")
            assert down.returncode == 0, f"two_node_cluster.sh down failed:\n{down.stdout}\n{down.stderr}"
            left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert "mllm_node" not in left and not os.path.exists(STATE_DIR), left


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("slurm2"))


@pytest.fixture(scope="module")
def shapes(workdir):
    from mllm_mega.data.synthetic import make_dataset

    out = os.path.join(workdir, "shapes")
    make_dataset(out, 200, 0, num_eval=4, samples_per_shard=100, progress=False)
    return out


# ----------------------------------------------------------------------------------------------- /proc probes

def _ip_of(hex_addr: str) -> str:
    """/proc/net/tcp{,6} address (little-endian 32-bit words) -> dotted IPv4 (IPv4-mapped IPv6 too)."""
    raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    ip6 = ipaddress.IPv6Address(raw)
    return str(ip6.ipv4_mapped or ip6)


def _established_peers(pid: int) -> set:
    """(local ip, remote ip) of the process's established TCP connections, read in its network namespace."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    peers = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and f[9] in inodes:   # ESTABLISHED
                peers.add((_ip_of(f[1].split(":")[0]), _ip_of(f[2].split(":")[0])))
    return peers


def _probe_workers(jid: str, seen: dict) -> None:
    """Record, per (attempt, rank), where each training worker of job `jid` runs and whom it talks to."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if b"mllm_mega.train" not in open(f"/proc/{pid}/cmdline", "rb").read():
                continue
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
            netns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") != jid or "RANK" not in env or "TORCHELASTIC_RUN_ID" not in env:
            continue   # not a worker of this job (e.g. the torchrun agent has no RANK)
        key = (int(env.get("SLURM_RESTART_COUNT", "0")), int(env["RANK"]))
        rec = seen.setdefault(key, {"node": env.get("SLURMD_NODENAME"), "netns": netns,
                                    "world": env.get("WORLD_SIZE"), "peers": set()})
        rec["peers"] |= _established_peers(pid)


def _netns_inode(node: str) -> int:
    return os.stat(f"/run/netns/mllm_{node}").st_ino


def _check_placement(seen: dict, attempt: int, log_text: str):
    """Rank 0 on node1, rank 1 on node2, each in its node's network namespace, talking to the other node."""
    where = {rank: rec for (a, rank), rec in seen.items() if a == attempt}
    assert sorted(where) == [0, 1], (attempt, seen, log_text[-3000:])
    for rank, node, other in ((0, "node1", "node2"), (1, "node2", "node1")):
        rec = where[rank]
        assert rec["node"] == node and rec["world"] == "2", (rank, rec)
        assert rec["netns"] == _netns_inode(node), (rank, rec, "not in the node's network namespace")
        assert (NODES[node], NODES[other]) in rec["peers"], (rank, rec, "no connection to the other node")


# ------------------------------------------------------------------------------------------------- SLURM jobs

def _submit(env, workdir, shapes, name, *overrides):
    run_dir = os.path.join(workdir, name)
    log = os.path.join(workdir, f"{name}.out")
    job_env = {**env, "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "REPO_DIR": ROOT, "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore"}
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--time=15", f"--job-name=mllm2n_{name}",
           f"--output={log}", f"--chdir={ROOT}", SCRIPT, CONFIG, f"run_dir={run_dir}", f"train.max_steps={STEPS}",
           "parallel.tp=1", "synthetic.dir=null", f"data.data_path={shapes}/train",
           f"data.tokenizer_dir={shapes}/tokenizer", "data.eval_data_path=null", "train.eval_num_captions=0",
           "logging.tensorboard=false", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=job_env, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0], run_dir, log


def _scontrol(env, *args) -> dict:
    res = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, env=env)
    if res.returncode != 0:
        return {}
    return dict(f.split("=", 1) for f in res.stdout.split() if "=" in f)


def _job(env, jid) -> dict:
    """scontrol's fields of the job ({} once SLURM has forgotten it)."""
    return _scontrol(env, "show", "job", "-o", jid)


def _wait(env, jid, log, timeout, seen, until=None, what="the job to finish"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        _probe_workers(jid, seen)
        job = _job(env, jid)
        if until is not None and until(job):
            return job
        if until is None and (not job or job.get("JobState") in TERMINAL):
            return job
        time.sleep(0.5)
    subprocess.run(["scancel", jid], timeout=30, env=env)
    pytest.fail(f"timed out waiting for {what} (job {jid}: {_job(env, jid)})\n{_read(log)[-4000:]}")


def _metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _tracker(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


def _check_nodes_logged(text):
    assert "[slurm node 0] node1: torchrun --nnodes=2 --nproc_per_node=1 (rendezvous node1:" in text, text[-4000:]
    assert "[slurm node 1] node2: torchrun --nnodes=2 --nproc_per_node=1 (rendezvous node1:" in text, text[-4000:]
    assert "layout tp=1 pp=1 dp=2" in text, text[-4000:]


@pytest.fixture(scope="module")
def reference(cluster, workdir, shapes):
    """An uninterrupted two-node run of STEPS iterations (checkpoints every 4)."""
    jid, run_dir, log = _submit(cluster, workdir, shapes, "reference", "checkpoint.save_interval=4")
    seen = {}
    job = _wait(cluster, jid, log, 600, seen)
    return jid, job, run_dir, log, seen


def test_two_nodes_to_completion(reference):
    jid, job, run_dir, log, seen = reference
    text = _read(log)
    assert job.get("JobState", "COMPLETED") == "COMPLETED", text[-4000:]
    assert f"training finished: iteration {STEPS} of {STEPS}" in text, text[-4000:]
    assert "requeueing" not in text
    _check_nodes_logged(text)
    _check_placement(seen, 0, text)
    assert [r["iteration"] for r in _metrics(run_dir)] == list(range(1, STEPS + 1))
    assert _tracker(run_dir) == STEPS


def test_two_nodes_usr1_requeue_resume(cluster, workdir, shapes, reference):
    env = cluster
    jid, run_dir, log = _submit(env, workdir, shapes, "requeue", "checkpoint.save_interval=100")
    seen = {}
    try:
        # the time-limit warning, as --signal=B:USR1@N sends it: to the batch shell only
        _wait(env, jid, log, 600, seen, until=lambda j: len(_metrics(run_dir)) >= 2
              or j.get("JobState") in TERMINAL, what="two training steps")
        assert len(_metrics(run_dir)) >= 2, _read(log)[-4000:]
        subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, timeout=30, env=env)

        # saved, requeued (held on SLURM's requeue delay); once both nodes are done with the old allocation,
        # skip the delay
        _wait(env, jid, log, 240, seen, until=lambda j: j.get("JobState") == "PENDING"
              and j.get("Reason") == "BeginTime" and "requeueing job" in _read(log), what="the requeue")
        _wait(env, jid, log, 120, seen, what="the nodes to finish completing",
              until=lambda j: all("COMPLETING" not in _scontrol(env, "show", "node", "-o", n).get("State", "")
                                  for n in NODES))
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True, timeout=30,
                       env=env)
        job = _wait(env, jid, log, 600, seen)
    finally:
        if _job(env, jid).get("JobState") not in TERMINAL + (None,):
            subprocess.run(["scancel", jid], timeout=30, env=env)

    text = _read(log)
    assert job.get("JobState", "COMPLETED") == "COMPLETED", text[-4000:]
    saved_at = int(text.split("[train] received signal 10: saving at iteration ")[1].split()[0])
    assert 2 <= saved_at < STEPS
    for line in ("received SIGUSR1: forwarding it",
                 f"stopped at iteration {saved_at} of {STEPS} (SIGUSR1, srun exit status 0)", "requeueing job",
                 "attempt 2 on 2 node(s)", f"resumed from {run_dir}/checkpoints/iter_{saved_at:07d}",
                 f"training finished: iteration {STEPS} of {STEPS}"):
        assert line in text, (line, text[-4000:])
    if job:
        assert job.get("Restarts") == "1", job
    _check_nodes_logged(text.split("attempt 2 on")[1])   # the resumed attempt used both nodes too
    _check_placement(seen, 0, text)                      # first attempt
    _check_placement(seen, 1, text)                      # the requeued one (SLURM_RESTART_COUNT=1)

    records = _metrics(run_dir)
    assert [r["iteration"] for r in records] == list(range(1, STEPS + 1))  # no iteration lost or repeated
    assert _tracker(run_dir) == STEPS
    # the resumed run continues exactly where the uninterrupted one was
    ref = _metrics(reference[2])
    assert [r["loss"] for r in records] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in ref]
    assert records[-1]["consumed_samples"] == ref[-1]["consumed_samples"]
    print(f"two-node losses (reference == resumed, saved at {saved_at}):", [r["loss"] for r in ref])
