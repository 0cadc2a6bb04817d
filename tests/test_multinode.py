"""Two hosts for real on one machine: two network namespaces joined by a veth pair, each with its own address, and
`torchrun --nnodes 2` rendezvousing across them (gloo over the veth link, like two hosts on a LAN; the run folder
stands for the shared file system). A short SFT and PPO run must end with the same weights as one node running the
same number of processes. Needs the right to create network namespaces (root / CAP_NET_ADMIN); skips otherwise."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import REPO, cli_env, same_weights

pytestmark = pytest.mark.slow
SUBNET = "10.231.77"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[list[tuple[str, str, str]]]:
    """[(namespace, interface, address)] of two hosts on one link; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to build network namespaces")
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"chatrl-{tag}-{i}", f"crl{tag}{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    if _ip("netns", "add", hosts[0][0]).returncode != 0:
        pytest.skip("cannot create network namespaces here (needs root / CAP_NET_ADMIN)")
    try:
        steps = [["netns", "add", hosts[1][0]],
                 ["link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1]]]
        for ns, dev, addr in hosts:
            steps += [["link", "set", dev, "netns", ns], ["-n", ns, "addr", "add", f"{addr}/24", "dev", dev],
                      ["-n", ns, "link", "set", dev, "up"], ["-n", ns, "link", "set", "lo", "up"]]
        for step in steps:
            proc = _ip(*step)
            assert proc.returncode == 0, f"ip {' '.join(step)}: {proc.stderr}"
        ping = subprocess.run(["ip", "netns", "exec", hosts[0][0], "ping", "-c", "1", "-W", "2", hosts[1][2]],
                              capture_output=True, text=True)
        assert ping.returncode == 0 or shutil.which("ping") is None, ping.stdout + ping.stderr
        yield hosts
    finally:
        for ns, _, _ in hosts:
            _ip("netns", "del", ns)  # deleting a namespace removes its end of the veth pair, and so the pair


def _torchrun() -> str:
    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def run_two_nodes(hosts: list[tuple[str, str, str]], args: list[str], port: int) -> None:
    """`chatrl ARGS` on two hosts, one process each (node 0 is the rendezvous master)."""
    procs = []
    for rank, (ns, dev, _) in enumerate(hosts):
        cmd = ["ip", "netns", "exec", ns, _torchrun(), "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", hosts[0][2], "--master_port", str(port),
               "-m", "chatrl", *args]
        # the veth link, as on a host with several interfaces; one thread per process on both layouts (torchrun sets
        # OMP_NUM_THREADS=1 only when it starts several processes per node, and thread count changes fp32 sums)
        env = cli_env(GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]


def run_one_node(args: list[str], port: int) -> None:
    cmd = [_torchrun(), "--nproc_per_node", "2", "--master_port", str(port), "-m", "chatrl", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sft_on_two_hosts_equals_one_host(two_hosts, tmp_path: Path, tiny_model_dir) -> None:
    args = ["sft", "--config", "configs/tiny-sft.yaml", "deepspeed.zero_stage=2", "optim.max_steps=6",
            "checkpoint.every=0", "logging.eval_every=0"]
    run_two_nodes(two_hosts, [*args, f"output_dir={tmp_path / 'two'}"], port=29571)
    run_one_node([*args, f"output_dir={tmp_path / 'one'}"], port=29572)
    assert same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model") == []


def test_ppo_on_two_hosts_equals_one_host(two_hosts, word_sft: Path, tmp_path: Path) -> None:
    data = word_sft.parent.parent / "words.jsonl"
    args = ["ppo", "--config", "configs/tiny-ppo.yaml", f"actor.name_or_path={word_sft}",
            f"critic.name_or_path={word_sft}", "reward.functions=[reward_fns:banana_share]", f"data.paths=[{data}]",
            "data.split=1,0,1", "ppo.iterations=2", "ppo.micro_batch_size=4", "checkpoint.every=0"]
    run_two_nodes(two_hosts, [*args, f"output_dir={tmp_path / 'two'}"], port=29573)
    run_one_node([*args, f"output_dir={tmp_path / 'one'}"], port=29574)
    assert same_weights(tmp_path / "one" / "actor", tmp_path / "two" / "actor") == []
    assert (tmp_path / "two" / "actor" / "config.json").exists()
