"""`env.name=verifiers:MODULE`: a verifiers environment (verifiers >= 0.4, the `verifiers.v1` stack) as a one-turn
chatrl environment. MODULE is a verifiers taskset package or module (it exports its `vf.Taskset` subclass in
`__all__`, as `vf-init` scaffolds it); it is loaded with verifiers' own entry point,
`vf.load_environment(vf.SingleAgentEnvConfig(taskset=...))`, and chatrl plays the role of verifiers' agent: the
task's prompt (and system prompt) is the first observation, the reply is scored by the task's own `vf.Task.score`
(its `@vf.reward` and `@vf.metric` functions and configured judges that need no runtime). The reward is verifiers'
weighted reward sum; success = reward >= `success_threshold` (env.kwargs, default 1.0); info holds every reward and
metric by name.

Splits: verifiers tasksets have none, so each task goes to one by a stable hash of its key (verifiers' content
identity): 1 in 10 is eval, the rest train (each split gets at least one task when there are two); task t of a split
is its (t mod n)-th task. Other env.kwargs go to the taskset's config (e.g. {"num_tasks": 50}); `max_tasks` caps
how many tasks are read from an endless taskset.

Not supported (one-line error when made): tasks that need a runtime box (`NEEDS_CONTAINER`) or tool servers
(`toolsets`), and environments whose module exports its own `vf.Env` (multi-agent or custom episodes): verifiers
runs those through its harness programs, which call the model themselves.

verifiers is an optional dependency (`pip install 'chatrl[verifiers]'`), imported when the environment is made.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatrl.data.types import Message
from chatrl.envs.base import TextEnv
from chatrl.errors import ChatrlError
from chatrl.plugins import import_optional

EXTRA = "verifiers"
EVAL_BUCKETS = 10  # 1 task in 10 is eval-only


def _text(content: Any) -> str:
    """A verifiers message content (text, or a list of content parts) as plain text."""
    if isinstance(content, str) or content is None:
        return content or ""
    return "\n".join(getattr(part, "text", "") or "" for part in content)


def _load_tasks(vf, module: str, config: dict[str, Any], max_tasks: int) -> list:
    try:
        taskset_config = vf.taskset_config_type(module)(id=module, **config)
        env = vf.load_environment(vf.SingleAgentEnvConfig(taskset=taskset_config))
        tasks = list(env.taskset.take(max_tasks))
    except ChatrlError:
        raise
    except Exception as e:  # import errors, config validation, the module's own load()
        raise ChatrlError(f"verifiers:{module}: loading it with env.kwargs {config} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not tasks:
        raise ChatrlError(f"verifiers:{module}: the taskset has no tasks")
    task_cls = type(tasks[0])
    if task_cls.NEEDS_CONTAINER or task_cls.toolsets(tasks[0].config) or type(env.taskset).toolsets(taskset_config):
        raise ChatrlError(f"verifiers:{module}: its tasks need a runtime box or tool servers, which chatrl does not "
                          "provide yet: only single-turn tasksets (a prompt, a reply, rewards) can be played")
    return tasks


def split_tasks(tasks: list, keys: list[str]) -> dict[str, list]:
    """{"train": [...], "eval": [...]}: a task is eval when the hash bucket of its key is 0; with two or more tasks
    neither split is left empty."""
    is_eval = [int(key[:8], 16) % EVAL_BUCKETS == 0 for key in keys]
    if len(tasks) >= 2 and all(is_eval):
        is_eval[0] = False
    if len(tasks) >= 2 and not any(is_eval):
        is_eval[-1] = True
    return {"train": [t for t, e in zip(tasks, is_eval, strict=True) if not e] or tasks,
            "eval": [t for t, e in zip(tasks, is_eval, strict=True) if e] or tasks}


class VerifiersEnv(TextEnv):
    """One reply per task, scored by the verifiers task's rewards."""

    max_turns = 1

    def __init__(self, module: str, success_threshold: float = 1.0, max_tasks: int = 100_000,
                 **config: Any) -> None:
        super().__init__()
        self.vf = import_optional("verifiers.v1", EXTRA, "env.name=verifiers:MODULE")
        self.module, self.success_threshold = module, float(success_threshold)
        tasks = _load_tasks(self.vf, module, config, max_tasks)
        self.splits = split_tasks(tasks, [task.key for task in tasks])
        self.task = tasks[0]
        self.prompt: list[Message] = []

    def task_for(self, split: str, task: int):
        tasks = self.splits[split]
        return tasks[task % len(tasks)]

    def _start(self, split: str, task: int) -> tuple[list[Message], dict[str, Any]]:
        self.task = self.task_for(split, task)
        data = self.task.data
        messages: list[Message] = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
        if isinstance(data.prompt, str):
            messages.append({"role": "user", "content": data.prompt})
        else:
            messages += [{"role": m.role, "content": _text(m.content)} for m in data.prompt or []]
        self.prompt = messages
        return messages, {"split": split, "task": task, "verifiers_idx": data.idx}

    def _trace(self, reply: str):
        """A verifiers Trace of this episode (prompt messages, then the reply as the sampled assistant turn)."""
        vf = self.vf
        kinds = {"system": vf.SystemMessage, "user": vf.UserMessage, "assistant": vf.AssistantMessage}
        messages = [kinds[m["role"]](content=m["content"]) for m in self.prompt] + [vf.AssistantMessage(content=reply)]
        nodes = [vf.MessageNode(message=m, parent=i - 1 if i else None, sampled=i == len(messages) - 1)
                 for i, m in enumerate(messages)]
        return vf.Trace(task=vf.TraceTask(type=type(self.task).__name__, data=self.task.data),
                        agent=vf.AgentInfo(config=vf.AgentConfig()), nodes=nodes)

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        reply = self._begin_step(action)
        self.done = True
        trace = self._trace(reply)
        asyncio.run(self.task.score(trace))  # verifiers' scoring is async; chatrl's step() is not
        reward = float(trace.reward)
        info = {"success": reward >= self.success_threshold,
                "rewards": {k: (r.score if r is not None else None) for k, r in trace.rewards.items()},
                "metrics": dict(trace.metrics)}
        answer = getattr(self.task.data, "answer", None)
        if answer is not None:
            info["answer"] = str(answer)
        return [], reward, True, False, info
