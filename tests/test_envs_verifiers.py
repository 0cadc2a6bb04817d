"""`env.name=verifiers:MODULE`: a verifiers (v1) taskset module, loaded through verifiers' own
`load_environment`, played one turn at a time with the task's rewards; the module is written here, a dataset built
in code and a rubric of two weighted rewards and a metric."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from chatrl.envs import make_env
from chatrl.envs.check import check_env
from chatrl.envs.verifiers_env import split_tasks
from chatrl.errors import ChatrlError
from helpers import REPO, read_metrics, run_cli

pytest.importorskip("verifiers.v1")

MODULE = '''
import verifiers.v1 as vf


class SumData(vf.TaskData):
    answer: str


class SumTask(vf.Task[SumData]):
    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        return float(trace.last_reply == self.data.answer)

    @vf.reward(weight=0.5)
    async def short(self, trace: vf.Trace) -> float:
        return float(len(trace.last_reply) <= 10)

    @vf.metric
    async def words(self, trace: vf.Trace) -> float:
        return float(len(trace.messages[-1].content.split()))


class SumConfig(vf.TasksetConfig):
    num_tasks: int = 30


class SumTaskset(vf.Taskset[SumTask, SumConfig]):
    def load(self):
        return [SumTask(SumData(prompt=f"What is {i} + {i + 1}?", system_prompt="Reply with the number only.",
                                answer=str(2 * i + 1)), self.config.task) for i in range(self.config.num_tasks)]


__all__ = ["SumTaskset"]
'''


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "h20_sums.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_prompts_come_from_the_taskset_and_rewards_from_its_rubric(module_dir: Path) -> None:
    env = make_env("verifiers:h20_sums", {"num_tasks": 30})
    messages, info = env.reset(options={"split": "train", "task": 4})
    i = info["verifiers_idx"]
    assert messages == [{"role": "system", "content": "Reply with the number only."},
                        {"role": "user", "content": f"What is {i} + {i + 1}?"}]
    # correct (weight 1) + short (weight 0.5): right and short 1.5, wrong but short 0.5, wrong and long 0
    _, reward, terminated, truncated, info = env.step(str(2 * i + 1))
    assert (reward, terminated, truncated, info["success"]) == (1.5, True, False, True)
    assert info["rewards"] == {"correct": 1.0, "short": 1.0} and info["metrics"] == {"words": 1.0}
    assert info["answer"] == str(2 * i + 1)
    env.reset(options={"split": "train", "task": 4})
    assert env.step(str(2 * i + 2))[1] == 0.5
    env.reset(options={"split": "train", "task": 4})
    _, reward, _, _, info = env.step("I am not sure what the sum is")
    assert reward == 0.0 and info["success"] is False and info["metrics"] == {"words": 8.0}


def test_splits_are_disjoint_and_cover_the_taskset(module_dir: Path) -> None:
    env = make_env("verifiers:h20_sums")
    train = {env.task_for("train", t).data.idx for t in range(100)}
    evals = {env.task_for("eval", t).data.idx for t in range(100)}
    assert train | evals == set(range(30)) and not train & evals and 0 < len(evals) < 10
    assert env.task_for("train", 3).data.idx == env.task_for("train", 3 + len(train)).data.idx  # t mod n


def test_split_tasks_by_key_hash() -> None:
    # hash buckets: "a0..." -> 0xa0 % 10 = 0 -> eval; "01..." -> 1, "ff..." -> 255 % 10 = 5: train
    assert split_tasks(["x", "y", "z"], ["000000a0", "00000001", "000000ff"]) == {"train": ["y", "z"], "eval": ["x"]}
    assert split_tasks(["x", "y"], ["00000001", "00000002"]) == {"train": ["x"], "eval": ["y"]}  # none: the last
    assert split_tasks(["x", "y"], ["0000000a", "00000014"]) == {"train": ["x"], "eval": ["y"]}  # all: not the first


def test_env_check_passes(module_dir: Path) -> None:
    assert check_env("verifiers:h20_sums", episodes=3) == []


def test_bad_modules_are_one_line(module_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ChatrlError, match="verifiers:h20_sums: loading it with env.kwargs .* failed: "
                                          "ValidationError") as err:
        make_env("verifiers:h20_sums", {"no_such_field": 1})
    assert "\n" not in str(err.value)
    with pytest.raises(ChatrlError, match="verifiers:h20_nothing_here: loading it .* ModuleNotFoundError"):
        make_env("verifiers:h20_nothing_here")
    monkeypatch.setitem(sys.modules, "verifiers.v1", None)
    with pytest.raises(ChatrlError, match=r"pip install 'chatrl\[verifiers\]'"):
        make_env("verifiers:h20_sums")


def test_one_grpo_iteration(module_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}", "env.name=verifiers:h20_sums",
                   "grpo.iterations=1", "rollout.prompts_per_rollout=2", "rollout.samples_per_prompt=2",
                   "rollout.max_new_tokens=8", "grpo.mini_batches=1", "grpo.micro_batch_size=4", "checkpoint.every=0",
                   PYTHONPATH=os.pathsep.join([str(module_dir), str(REPO / "tests")]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = read_metrics(out)
    # 8 new tokens are never the right number here, and are short (<= 10 characters) only when mostly spaces: each
    # reward is 0 or 0.5, so the mean is a multiple of 0.125 in [0, 0.5]
    assert row["turns"] == 1 and 0 <= row["reward_mean"] <= 0.5 and (row["reward_mean"] * 8).is_integer()
    assert (out / "actor" / "model.safetensors").exists()
