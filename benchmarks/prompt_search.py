"""Pareto selection (GEPA) against beam search (Agent Lightning's APO) at equal rollout budgets.

THE LLMs ARE SIMULATED. No model runs here (hosted APIs cannot be reached from this machine):
the agent's LLM and the optimizer LLM are the small deterministic functions below. What is real
is the search: `lightspan.loop.prompt_search.Search` with its selection, budgets, minibatches
and resume keys, and `lightspan.algorithms.prompts` (Pareto front, parent sampling, the beam,
placeholder checks, the reflection prompt the optimizer reads, parsing its reply), exactly as
`Trainer(algorithm=APO(...)).fit` runs them; only the backend (who answers a rollout, who answers
the optimizer) is swapped for a simulation.

The suite, and why it is a fair test of the question asked (does per-task Pareto selection find a
better prompt than keeping the best few by mean, for the same number of rollouts?):
- Tasks are of five kinds in unequal shares (validation: 5, 4, 3, 2, 2 of 16 tasks; training
  twice that). Each kind is helped by one instruction (answer format, units, language, ...), the
  situation GEPA's paper argues for: different instructions help different subsets of tasks.
  Two of them conflict (a one-word answer and step-by-step reasoning): with both in the prompt,
  each helps less, so no prompt is best everywhere.
- The agent's LLM: a rollout of a task succeeds with probability 0.9 when the prompt has its
  kind's instruction (0.5 when the conflicting one is there too), else 0.15; each draw is seeded
  by (prompt, task, run seed), so a rollout is reproducible, and the noise is real: a prompt's
  validation score is an estimate, as with a real model.
- The optimizer LLM reads the real reflection prompt (the current prompt, then each rollout's
  task, reply and reward), picks one kind among the failures it was shown and adds that kind's
  instruction; like a real rewrite, it sometimes (p = 0.3) drops an instruction the prompt
  already had. Its choices are seeded by what it was shown, so both selections face the same
  optimizer.
- Every method gets the same seeds, the same tasks, the same rollout budget and the same
  optimizer; beam runs APO's defaults (beam 4, branch 4, 4 tasks per critique, 16 validation
  tasks) for as many rounds as the budget allows, Pareto GEPA's loop (minibatch 4, a rewrite is
  validated only when it beats its parent on the minibatch). A third, `best`, runs GEPA's loop
  with the best candidate by mean as every parent (GEPA's own ablation): the difference between
  it and beam is the loop's economy, between it and Pareto the selection.
- Reported: the validation score of the prompt each method returns (what the search itself sees,
  noisy) and its expected score (the mean success probability of that prompt over the validation
  tasks, without noise: selection on noisy scores flatters the winner), and the rollouts each
  needed before its best validation score first reached the target; mean +- sd over seeds, and
  the ratios Pareto / beam.

Measured (the shared 2-core development machine; the figures do not depend on it, the run is
deterministic): 5 seeds x 600 rollouts, expected score of the returned prompt (the best single
prompt: 0.806) beam 0.637 +- 0.053, best-parent 0.749 +- 0.076, Pareto 0.778 +- 0.063 (ratio
Pareto / beam 1.22); rollouts to 0.75 beam > 577 +- 50 (2/5 seeds), best-parent 214 +- 111 (5/5),
Pareto > 271 +- 195 (4/5) (beam / Pareto 2.13). 10 seeds x 1,000: beam 0.730 +- 0.068, best-parent
0.775 +- 0.058, Pareto 0.804 +- 0.003. Most of the gain over beam is the loop's economy; Pareto
against best-parent is within the spread at 300 rollouts and ahead at 600 and 1,000.

    python benchmarks/prompt_search.py                 # 5 seeds, 600 rollouts each (seconds)
    python benchmarks/prompt_search.py --seeds 0 1 2 3 4 5 6 7 8 9 --budget 1000
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import statistics
from collections.abc import Sequence

from lightspan.algorithms.prompts import Example
from lightspan.loop.prompt_search import APO, Candidate, Search
from lightspan.types import LLM, PromptTemplate

KINDS = {  # kind -> the instruction that helps it
    "format": "Answer in valid JSON.",
    "units": "Always state SI units.",
    "language": "Reply in the language of the question.",
    "terse": "Answer in one word.",
    "reasoning": "Explain your reasoning step by step.",
}
CONFLICTS = {"terse": "reasoning", "reasoning": "terse"}
VAL_SHARES = {"format": 5, "units": 4, "language": 3, "terse": 2, "reasoning": 2}
SEED_PROMPT = "You are a helpful assistant. Task: {question}"
P_RULE, P_CONFLICT, P_NONE, P_DROP = 0.9, 0.5, 0.15, 0.3


def _uniform(*parts: object) -> float:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def success_probability(prompt: str, kind: str) -> float:
    if KINDS[kind] not in prompt:
        return P_NONE
    rival = CONFLICTS.get(kind)
    return P_CONFLICT if rival is not None and KINDS[rival] in prompt else P_RULE


def make_tasks(seed: int) -> tuple[dict[str, str], list[str], list[str]]:
    """Task id -> kind; training ids (two of each validation task's kind); validation ids."""
    kinds: dict[str, str] = {}
    val, train = [], []
    for kind, share in VAL_SHARES.items():
        for i in range(share):
            kinds[f"val-{kind}-{i}"] = kind
            val.append(f"val-{kind}-{i}")
        for i in range(2 * share):
            kinds[f"train-{kind}-{i}"] = kind
            train.append(f"train-{kind}-{i}")
    random.Random(seed).shuffle(train)
    return kinds, train, val


class SimulatedBackend:
    """`prompt_search.Backend` with a simulated agent LLM and optimizer (see the module doc)."""

    def __init__(self, kinds: dict[str, str], seed: int):
        self.kinds, self.seed = kinds, seed
        self.candidates: list[Candidate] = []

    def stored_candidates(self) -> list[Candidate]:
        return []

    def add_candidate(
        self, text: str, parents: tuple[int, ...], origin: str, key: str, rejected: str | None
    ) -> Candidate:
        candidate = Candidate(len(self.candidates) + 1, text, parents, origin, key, rejected)
        self.candidates.append(candidate)
        return candidate

    def _reward(self, text: str, task: str, sample: int) -> float:
        p = success_probability(text, self.kinds[task])
        return 1.0 if _uniform(self.seed, text, task, sample) < p else 0.0

    def score(self, candidate: Candidate, task_ids: Sequence[str], samples: int) -> dict[str, float]:
        return {
            t: statistics.fmean(self._reward(candidate.text, t, k) for k in range(samples)) for t in task_ids
        }

    def examples(self, candidate: Candidate, task_ids: Sequence[str], samples: int) -> list[Example]:
        out = []
        for t in task_ids:
            reward = self._reward(candidate.text, t, 0)
            reply = "a fine answer" if reward else "an answer that missed what the task needed"
            task = f"[kind: {self.kinds[t]}] question {t}"
            out.append(Example(t, task, reward, [{"role": "assistant", "content": reply}]))
        return out

    def ask(self, messages: list[dict[str, str]]) -> str:
        """The simulated optimizer: add the instruction of one failing kind, sometimes drop one."""
        user = messages[-1]["content"]
        current = re.search(r"<prompt>\n(.*?)\n</prompt>", user, re.DOTALL)
        prompt = current.group(1) if current else SEED_PROMPT
        failing = sorted(set(re.findall(r"reward 0\)\nTask: \[kind: (\w+)\]", user)))
        rng = random.Random(f"{self.seed}:{user}")
        rules = [r for r in KINDS.values() if r in prompt]
        if rules and rng.random() < P_DROP:
            prompt = prompt.replace(rng.choice(rules) + " ", "")
        missing = [k for k in failing if KINDS[k] not in prompt]
        if missing:
            prompt = f"{KINDS[rng.choice(missing)]} {prompt}"
        return prompt

    def log(self, rollouts: int, metrics: dict[str, float]) -> None:
        pass


def expected_score(prompt: str, kinds: dict[str, str], val: Sequence[str]) -> float:
    return statistics.fmean(success_probability(prompt, kinds[t]) for t in val)


def run_one(selection: str, seed: int, budget: int, target: float) -> dict[str, float]:
    kinds, train, val = make_tasks(seed)
    apo = APO(
        optimizer=LLM("http://simulated", "simulated"),
        selection=selection,  # type: ignore[arg-type]
        rollout_budget=budget,
        optimizer_budget=10_000,
        rounds=None,
    )
    backend = SimulatedBackend(kinds, seed)
    result = Search(apo, backend, PromptTemplate(SEED_PROMPT), train, val, seed=seed, progress=False).run()
    reached = next((r for r, best, _ in result.history if best >= target), None)
    return {
        "val": result.val_score,
        "expected": expected_score(result.best.text, kinds, val),
        "to_target": float(reached) if reached is not None else float(budget + 1),
        "reached": float(reached is not None),
        "rollouts": float(result.rollouts),
    }


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=600, help="rollouts per search (both methods)")
    parser.add_argument("--target", type=float, default=0.75, help="validation score to reach")
    args = parser.parse_args(argv)
    kinds, _, val = make_tasks(0)
    best_possible = max(  # every instruction but one of the two that conflict
        expected_score(" ".join(KINDS[k] for k in KINDS if k != drop), kinds, val) for drop in CONFLICTS
    )
    print(
        f"SIMULATED LLMs (see the docstring). {len(args.seeds)} seeds, {args.budget} rollouts per search, "
        f"target {args.target}; the best single prompt's expected score is {best_possible:.3f}"
    )
    rows = {}
    for selection in ("beam", "best", "pareto"):
        runs = [run_one(selection, seed, args.budget, args.target) for seed in args.seeds]
        rows[selection] = {key: [r[key] for r in runs] for key in runs[0]}
        val, expected, to_target = (_mean_sd(rows[selection][k]) for k in ("val", "expected", "to_target"))
        reached = int(sum(rows[selection]["reached"]))
        bound = ">" if reached < len(args.seeds) else ""
        print(
            f"{selection:>6}: best validation score {val[0]:.3f} +- {val[1]:.3f}, expected {expected[0]:.3f} "
            f"+- {expected[1]:.3f}; rollouts to {args.target}: {bound}{to_target[0]:.0f} +- {to_target[1]:.0f} "
            f"({reached}/{len(args.seeds)} seeds reached it)"
        )
    for baseline in ("beam", "best"):
        ratio = statistics.fmean(rows["pareto"]["expected"]) / statistics.fmean(rows[baseline]["expected"])
        speed = statistics.fmean(rows[baseline]["to_target"]) / statistics.fmean(rows["pareto"]["to_target"])
        print(
            f"ratio pareto / {baseline}: expected score {ratio:.2f}x; "
            f"rollouts to target {baseline} / pareto {speed:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
