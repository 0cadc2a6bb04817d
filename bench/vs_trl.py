"""chatrl against TRL on the same work: a PPO iteration (TRL 1.12.0's PPOTrainer, the last release that has it)
and a GRPO step (the newest TRL's GRPOTrainer), runs alternated chatrl, TRL, chatrl, TRL, ..., medians and the
ratio TRL/chatrl printed; at the real model size and at the tiny-random size (the overhead regime).

    .venv/bin/python bench/vs_trl.py                        # both kinds, both sizes, 2 pairs; bench/results/vs_trl.json
    .venv/bin/python bench/vs_trl.py --only ppo --size real --runs 3
    .venv/bin/python bench/vs_trl.py --quick                # smoke: tiny model, 2 iterations, 1 pair, 8 new tokens

Work (identical on both sides; token counts of every iteration compared, a mismatch fails the run):
  PPO : 4 x the model (actor, frozen reference, critic and reward model from the same folder), 8 prompts of
        exactly 64 tokens, exactly 64 new tokens (chatrl: min = max new tokens; TRL: no stop token), 1 PPO epoch,
        1 mini-batch, micro-batch 8, KL 0.05 in the reward, 8 iterations.
  GRPO: 8 prompts x G=4 samples = 32 sequences of 64 new tokens per iteration, one optimizer step in micro-batches
        of 8, no KL (beta 0: no reference model), rule reward `bench/trl/rewards.py:length_mod`.
  fp32, temperature 1, no top-k / top-p, no evaluation, saving or trackers, torch's default threads.
Timing: chatrl = the real `chatrl ppo|grpo` CLI; s/iteration = differences of the `time` stamps of consecutive
metrics.jsonl rows (phases: time_generate, time_score + time_rewards, time_train). TRL = `bench/trl/*_trl.py`
in a venv of its own (see `trl_venv`), timed per step by a TrainerCallback and per phase by wrapping the trainer's
functions (docstrings there). Each run's median over iterations 2..K, then the median over runs. Peak RSS: the
run's process (and its waited children), from wait4's rusage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRL_DIR = ROOT / "bench" / "trl"
for _p in (ROOT / "bench", TRL_DIR, ROOT / "src"):  # bench/common.py, bench/trl/*.py, chatrl
    sys.path.insert(0, str(_p))

from common import machine, write_json  # noqa: E402  (bench/common.py: the suite's machine record)
from prompts import make_prompts, verified_prompt_ids, write_prompts  # noqa: E402
from report import compare, run_summary, table, work_mismatches  # noqa: E402

PPO_TRL = "1.12.0"  # PPOTrainer was removed from TRL after 1.12
MODELS = {"real": "smollm2-135m-instruct", "tiny": "tiny-random"}
SEED, LR, PPO_KL = 42, 1e-5, 0.05
# What the phase columns hold on each side where the two trainers cut an iteration differently (printed, stored)
PHASE_NOTES = {
    "ppo": "phases: chatrl generate = rollout + reward-model forward, score = actor (old log-probs), reference and "
           "critic forwards + rewards/GAE; TRL generate = HF generate (old log-probs from its logits), score = "
           "reference, value and reward forwards + rewards/GAE; train = actor + critic update on both",
    "grpo": "phases: generate = rollout (+ the rule reward in chatrl's), score = rewards + group advantages (no "
            "separate log-prob forward on either side: one on-policy step), train = micro-batches + optimizer step",
}


class BenchError(RuntimeError):
    """A one-line reason the benchmark cannot go on (printed without a traceback)."""


def chatrl_home() -> Path:
    return Path(os.environ.get("CHATRL_HOME", Path.home() / ".cache" / "chatrl")).expanduser()


def last_error(stderr: str, stdout: str = "") -> str:
    """pip's last ERROR line, else the last line that is not a warning (pip's index warnings are noise here)."""
    lines = [ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    rest = [ln for ln in lines if not ln.startswith(("WARNING", "Looking in"))]
    return (errors or rest or ["no output"])[-1]


def made_venvs() -> list[str]:
    """TRL versions whose venv was made (stamped) under $CHATRL_HOME/bench-venvs, oldest first."""
    from packaging.version import Version

    found = [p.name[len("trl-"):] for p in (chatrl_home() / "bench-venvs").glob("trl-*") if (p / "vs-trl.stamp").exists()]
    return sorted(found, key=Version)


def newest_trl() -> str:
    """The newest TRL release on the package index (`pip index versions trl`); offline, the newest venv made."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "trl"], capture_output=True, text=True,
                          timeout=120)
    m = re.search(r"^trl \(([^)]+)\)", proc.stdout, re.M)
    if not proc.returncode and m:
        return m.group(1)
    made = [v for v in made_venvs() if v != PPO_TRL]
    if made:
        print(f"the package index did not answer: GRPO uses TRL {made[-1]}, the newest venv made", flush=True)
        return made[-1]
    raise BenchError(f"cannot find the newest TRL release (pip index versions trl: {last_error(proc.stderr)}); "
                     "pass --grpo-trl X.Y.Z")


def trl_venv(version: str) -> Path:
    """The python of `$CHATRL_HOME/bench-venvs/trl-<version>`, made on first use, reused once its stamp exists.

    `python -m venv`, then a .pth file appending chatrl's site-packages to the venv's sys.path (torch,
    transformers, accelerate, datasets are shared instead of downloaded again), then `pip install trl==<version>`:
    whatever that release needs in another version lands in the venv's own site-packages, which comes first on
    sys.path and shadows the shared copy (pip does not uninstall outside the venv)."""
    venv = chatrl_home() / "bench-venvs" / f"trl-{version}"
    python, stamp = venv / "bin" / "python", venv / "vs-trl.stamp"
    shared = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    want = json.dumps({"trl": version, "shared": shared})
    if stamp.exists() and python.exists() and stamp.read_text() == want:
        return python
    print(f"making the TRL {version} venv: {venv}", flush=True)

    def step(cmd: list[str], what: str) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise BenchError(f"cannot make the TRL {version} venv ({what}): {last_error(proc.stderr, proc.stdout)}")
        return proc.stdout

    shutil.rmtree(venv, ignore_errors=True)  # a venv without its stamp is a failed earlier attempt
    step([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    own = step([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "site-packages")
    Path(own.strip(), "chatrl-shared.pth").write_text("".join(p + "\n" for p in shared))
    step([str(python), "-m", "pip", "install", "--disable-pip-version-check", f"trl=={version}"],
         f"pip install trl=={version}")
    got = step([str(python), "-c", "import trl, transformers; print(trl.__version__, transformers.__version__)"],
               "import trl")
    print(f"  TRL {version} venv ready (trl, transformers = {got.strip()})", flush=True)
    stamp.write_text(want)
    return python


def loadavg() -> float:
    return os.getloadavg()[0]


# The run's parent: a bare python (-S: no site, ~10 MB) that starts the command and writes wait4's rusage of it. A
# child of THIS process would not do: Linux records the pre-exec address space's high-water mark in the child's
# ru_maxrss, i.e. the benchmark's own RSS (chatrl + torch imported) would floor every run's peak.
RSS_PARENT = ("import json, os, subprocess, sys\n"
              "p = subprocess.Popen(sys.argv[2:])\n"
              "_, status, usage = os.wait4(p.pid, 0)\n"
              "rc = os.waitstatus_to_exitcode(status)\n"
              "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'maxrss_kib': usage.ru_maxrss}))\n"
              "sys.exit(0)\n")


def measured(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[int, float]:
    """Run `cmd` (output to `log`) -> (exit code, peak RSS in GiB of its process and its waited-for children)."""
    report = log.with_suffix(".rss.json")
    report.unlink(missing_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-S", "-c", RSS_PARENT, str(report), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{' '.join(cmd[:3])} ran past {timeout:.0f} s (log: {log})") from None
        finally:  # timeout, Ctrl-C or SIGTERM (see main): never leave a run behind on the cores
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the wrapper and the run
                proc.wait()
    if not report.exists():
        raise BenchError(f"{' '.join(cmd[:3])}: no exit report (log: {log})")
    got = json.loads(report.read_text())
    return got["rc"], got["maxrss_kib"] / 2**20  # KiB on Linux


def failure(what: str, log: Path) -> BenchError:
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-15:]
    return BenchError(f"{what} failed (log {log}):\n    " + "\n    ".join(tail))


def chatrl_overrides(w: dict[str, Any], out_dir: Path) -> list[str]:
    """`chatrl ppo|grpo` overrides for the work `w` (the rest are chatrl's defaults)."""
    kind, model, new = w["kind"], w["model"], w["new_tokens"]
    sec = kind  # the options section: ppo.* or grpo.*
    o = [f"output_dir={out_dir}", f"seed={SEED}", f"actor.name_or_path={model}", "actor.dtype=fp32",
         f"data.paths=[{w['prompts_file']}]", "data.split=0,0,1", "data.eval_fraction=0",
         f"data.max_prompt_length={w['prompt_tokens']}", f"rollout.prompts_per_rollout={w['prompts_per_iteration']}",
         f"rollout.samples_per_prompt={w['samples_per_prompt']}", f"rollout.max_new_tokens={new}",
         f"rollout.min_new_tokens={new}", "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0",
         "rollout.inference_dtype=fp32", f"actor_optim.lr={LR}", "logging.report_to=[]", "logging.progress=false",
         f"{sec}.iterations={w['iterations']}", f"{sec}.ppo_epochs=1", f"{sec}.mini_batches=1",
         f"{sec}.micro_batch_size={w['micro_batch']}"]
    if kind == "ppo":
        return o + [f"critic.name_or_path={model}", "critic.dtype=fp32", f"reward.model={model}", "reward.dtype=fp32",
                    "reference.dtype=fp32", f"ppo.kl_coef={PPO_KL}"]
    return o + [f"reward.functions=[{TRL_DIR / 'rewards.py'}:length_mod]", "grpo.kl_coef=0"]


def prepare(w: dict[str, Any], work_dir: Path) -> None:
    """Prompts of exactly `prompt_tokens` tokens (one per prompt of every iteration), written as chatrl's data file
    and verified through chatrl's own data pipeline; their ids go into `w` for the TRL side."""
    from chatrl.config_rl import GRPOConfig, PPOConfig
    from chatrl.configbase import load_config
    from chatrl.models.loading import load_tokenizer

    tok = load_tokenizer(w["model"])
    texts = make_prompts(tok, w["prompts_per_iteration"] * w["iterations"], w["prompt_tokens"])
    w["prompts_file"] = str(work_dir / f"prompts-{w['size']}-{w['kind']}.jsonl")
    write_prompts(Path(w["prompts_file"]), texts)
    cfg = load_config(PPOConfig if w["kind"] == "ppo" else GRPOConfig, overrides=chatrl_overrides(w, work_dir))
    w["prompt_texts"], w["prompt_ids"] = texts, verified_prompt_ids(cfg.data, tok, texts, w["prompt_tokens"])


def run_chatrl(w: dict[str, Any], work_dir: Path, tag: str, env: dict[str, str]) -> dict[str, Any]:
    out_dir, log = work_dir / f"chatrl-{tag}", work_dir / f"chatrl-{tag}.log"
    cmd = [str(Path(sys.executable).with_name("chatrl")), w["kind"], *chatrl_overrides(w, out_dir)]
    rc, rss = measured(cmd, log, env, timeout=7200)
    if rc:
        raise failure(f"chatrl {w['kind']} ({tag})", log)
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_generate" in r]
    iterations, counts = [], []
    for k, r in enumerate(rows):
        # s/iteration = the wall time between consecutive rows (the whole loop body); the first row has no
        # predecessor, so its seconds are the sum of its phases (it is left out of the medians anyway)
        phases = {"generate": r["time_generate"], "score": r.get("time_score", 0.0) + r.get("time_rewards", 0.0),
                  "train": r["time_train"]}
        seconds = r["time"] - rows[k - 1]["time"] if k else sum(phases.values())
        iterations.append({"seconds": seconds, **phases})
        n = w["prompts_per_iteration"] * w["samples_per_prompt"]
        counts.append({"sequences": n, "prompt_tokens": n * w["prompt_tokens"],
                       "new_tokens": round(r["response_length"] * n), "eos_rate": r["eos_rate"]})
    shutil.rmtree(out_dir, ignore_errors=True)  # the saved actor/critic folders: ~0.5 GiB each
    return {"iterations": iterations, "counts": counts, "peak_rss_gib": rss,
            "seconds_source": "differences of metrics.jsonl time stamps"}


def run_trl(w: dict[str, Any], python: Path, work_dir: Path, tag: str, env: dict[str, str]) -> dict[str, Any]:
    spec, result, log = (work_dir / f"trl-{tag}.{x}" for x in ("spec.json", "result.json", "log"))
    fields = ("model", "prompt_texts", "prompt_ids", "new_tokens", "prompts_per_iteration", "samples_per_prompt",
              "micro_batch", "iterations", "gradient_checkpointing")
    spec.write_text(json.dumps({**{k: w[k] for k in fields}, "seed": SEED, "temperature": 1.0, "learning_rate": LR,
                                "kl_coef": PPO_KL, "result": str(result)}))
    script = TRL_DIR / ("ppo_trl.py" if w["kind"] == "ppo" else "grpo_trl.py")
    rc, rss = measured([str(python), str(script), str(spec)], log, env, timeout=7200)
    if rc:
        raise failure(f"TRL {w['kind']} ({tag})", log)
    data = json.loads(result.read_text())
    return {**data, "peak_rss_gib": rss}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=["ppo", "grpo"], help="one kind only (default: both)")
    parser.add_argument("--size", choices=["real", "tiny", "both"], default="both")
    parser.add_argument("--runs", type=int, default=2, help="pairs of runs (chatrl, TRL), alternated")
    parser.add_argument("--iterations", type=int, default=8, help="iterations per run (medians of 2..K)")
    parser.add_argument("--tiny-iterations", type=int, default=None, help="iterations at the tiny size (default: "
                                                                          "--iterations)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smoke: tiny model, 2 iterations, 1 pair, 8 new tokens")
    parser.add_argument("--ppo-trl", default=PPO_TRL, help="TRL release for PPO")
    parser.add_argument("--grpo-trl", default="latest", help="TRL release for GRPO (latest = pip index)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient_checkpointing=True (default: off, as chatrl's default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_trl.json"))


def compare_on(w: dict[str, Any], runs_n: int, python: Path, work_dir: Path, env: dict[str, str],
               trl_version: str) -> dict[str, Any]:
    """`runs_n` pairs of runs of the work `w`, alternated chatrl, TRL, chatrl, TRL, ... -> the result entry."""
    runs: dict[str, list[dict[str, Any]]] = {"chatrl": [], "trl": []}
    size, kind = w["size"], w["kind"]
    for i in range(runs_n):
        for system in ("chatrl", "trl"):
            tag, before = f"{size}-{kind}-{i + 1}", loadavg()
            r = run_chatrl(w, work_dir, tag, env) if system == "chatrl" else run_trl(w, python, work_dir, tag, env)
            r.update(load_before=before, load_after=loadavg(), summary=run_summary(r["iterations"], r["peak_rss_gib"]))
            runs[system].append(r)
            s = r["summary"]
            print(f"[{size} {kind}] run {i + 1}/{runs_n} {system}: {s['seconds']:.2f} s/iteration (median of "
                  f"{s['iterations_used']}), peak RSS {s['peak_rss_gib']:.2f} GiB, load {before:.2f} -> "
                  f"{r['load_after']:.2f}", flush=True)
    mismatch = [f"{system} run {i + 1} vs chatrl run 1: {p}" for system in ("chatrl", "trl")
                for i, r in enumerate(runs[system]) for p in work_mismatches(runs["chatrl"][0]["counts"], r["counts"])]
    summaries = {system: [r["summary"] for r in rs] for system, rs in runs.items()}
    cmp = compare(summaries["chatrl"], summaries["trl"], kind)
    c0, t0 = runs["chatrl"][0]["counts"][0], runs["trl"][0]["counts"][0]
    title = (f"{kind.upper()} at {size} size ({MODELS[size]}), {w['iterations']} iterations, medians of "
             f"2..{w['iterations']}")
    text = (table(title, summaries["chatrl"], summaries["trl"], cmp, trl_version) +
            f"\nwork per iteration: chatrl {c0['sequences']} sequences, {c0['prompt_tokens']} prompt + "
            f"{c0['new_tokens']} new tokens (EOS rate {c0['eos_rate']:.2f}); TRL {t0['sequences']} sequences, "
            f"{t0['prompt_tokens']} prompt + {t0['new_tokens']} new tokens\n{PHASE_NOTES[kind]}" +
            ("\nWORK DIFFERS: " + "; ".join(mismatch) if mismatch else ""))
    work = {k: v for k, v in w.items() if k not in ("prompt_texts", "prompt_ids", "prompts_file")}
    return {"kind": kind, "size": size, "trl_version": trl_version, "ratio": cmp["ratio"], "target": cmp["target"],
            "met": cmp["met"], "compare": cmp, "phase_notes": PHASE_NOTES[kind], "work": work, "work_mismatches": mismatch, "runs": runs, "text": text}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison; writes `args.out` after every (kind, size) and returns the payload. Results are keyed
    "<kind>-<size>" (e.g. "ppo-real") with the overall ratio TRL/chatrl at the top of each entry."""
    if args.quick:
        args.size, args.runs, args.iterations, args.tiny_iterations, args.new_tokens = "tiny", 1, 2, 2, 8
    kinds = [args.only] if args.only else ["ppo", "grpo"]
    sizes = ["real", "tiny"] if args.size == "both" else [args.size]
    versions = {"ppo": args.ppo_trl, "grpo": newest_trl() if args.grpo_trl == "latest" else args.grpo_trl}
    pythons = {k: trl_venv(versions[k]) for k in kinds}
    from chatrl.models.builtin import resolve_model_path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    payload: dict[str, Any] = {"machine": machine(), "chatrl_commit": commit.stdout.strip(), "versions": versions,
                               "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "results": {}}
    failed = []
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        for size in sizes:
            for kind in kinds:
                iters = args.tiny_iterations if size == "tiny" and args.tiny_iterations else args.iterations
                w = {"kind": kind, "size": size, "model": resolve_model_path(MODELS[size]), "iterations": iters,
                     "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "prompts_per_iteration": 8,
                     "samples_per_prompt": 1 if kind == "ppo" else 4, "micro_batch": 8,
                     "gradient_checkpointing": args.trl_gradient_checkpointing}
                prepare(w, Path(tmp))
                entry = compare_on(w, args.runs, pythons[kind], Path(tmp), env, versions[kind])
                payload["results"][f"{kind}-{size}"] = entry
                failed += entry["work_mismatches"]
                payload["load_avg_end"] = loadavg()
                write_json(args.out, payload)  # after every entry: a late failure keeps what was measured
    print("\n" + "\n\n".join(e["text"] for e in payload["results"].values()))
    print(f"\nload average (1 min): {payload['machine']['load_avg_1min']:.2f} at the start, "
          f"{payload['load_avg_end']:.2f} at the end; OMP_WAIT_POLICY={payload['machine']['omp_wait_policy']}")
    if failed:
        raise BenchError("the two sides did not do the same work: " + "; ".join(failed))
    return payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind (and kill the current run) on SIGTERM too
    try:
        run(ap.parse_args())
    except (BenchError, ValueError) as e:
        sys.exit(f"vs_trl: {e}")


if __name__ == "__main__":
    main()
