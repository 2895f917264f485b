"""`lightspan demo`: the whole closed loop on the bundled task (see `lightspan.loop.demo`), and
`lightspan optimize-prompt`: a prompt search seeded from a service's stored rollouts."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the whole loop on a bundled task: tiny model, warm-up, GRPO (CPU, embedded store)",
        description="Build a tiny model offline, land scripted warm-up episodes through the tracing path, "
        "warm up with SFT, then run GRPO through the real loop (collector, trainer --follow, lightspan serve, "
        "runners). Prints the success rate per iteration; writes reward.png and the checkpoints to --workdir.",
    )
    demo.add_argument(
        "--workdir",
        default="./lightspan-demo",
        help="where the store, checkpoints, logs and "
        "reward.png go (default ./lightspan-demo; must not hold an earlier demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seeds the model, the warm-up and the sampling")
    demo.add_argument(
        "--iterations", type=int, default=None, help="GRPO iterations (default: the recipe's 40)"
    )
    demo.add_argument("--runners", type=int, default=2, help="runner processes (default 2)")
    demo.add_argument("--concurrency", type=int, default=16, help="episodes per runner at once (default 16)")
    demo.set_defaults(func=_demo)
    _register_optimize_prompt(subparsers)


def _register_optimize_prompt(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "optimize-prompt",
        help="search a prompt resource from a service's stored rollouts (APO: GEPA or beam)",
        description="Seed reflection with the stored rollouts of --service (failures and successes, with "
        "their rewards), score candidates by replaying the tasks those rollouts recorded "
        "(lightspan.emit_observation('task', task)) through --agent, and publish the best prompt as the "
        "next version of --resource when it beats the current one. The agent's LLM and the optimizer are "
        "any OpenAI-compatible endpoints (defaults from OPENAI_BASE_URL, OPENAI_API_KEY, AGENT_MODEL, "
        "OPTIMIZER_MODEL).",
    )
    env = os.environ.get
    parser.add_argument(
        "--store", default=None, help="store URL (default LIGHTSPAN_STORE or ./lightspan-data)"
    )
    parser.add_argument(
        "--service", required=True, help="the production service whose rollouts seed the search"
    )
    parser.add_argument(
        "--resource", required=True, help="the prompt resource to improve (its latest version)"
    )
    parser.add_argument(
        "--since", default="7d", help="rollouts started within this (7d, 12h, 30m) or since ISO"
    )
    parser.add_argument("--agent", required=True, help="module:function, the agent (task, llm, <resource>)")
    parser.add_argument("--llm-base-url", default=env("OPENAI_BASE_URL"), help="the agent's LLM endpoint")
    parser.add_argument("--llm-model", default=env("AGENT_MODEL"), help="the agent's model name")
    parser.add_argument("--api-key", default=env("OPENAI_API_KEY", "none"), help="API key of both endpoints")
    parser.add_argument(
        "--optimizer-base-url", default=env("OPTIMIZER_BASE_URL"), help="(default: --llm-base-url)"
    )
    parser.add_argument(
        "--optimizer-model", default=env("OPTIMIZER_MODEL"), help="the optimizer's model name"
    )
    parser.add_argument("--selection", choices=["pareto", "beam", "best"], default="pareto")
    parser.add_argument("--rollout-budget", type=int, default=200)
    parser.add_argument("--optimizer-budget", type=int, default=20)
    parser.add_argument("--max-rollouts", type=int, default=500, help="stored rollouts to read at most")
    parser.add_argument("--reflect", type=int, default=8, help="stored rollouts shown to the optimizer")
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument(
        "--workdir", default="./lightspan-apo", help="logs (and the store when none is given)"
    )
    parser.add_argument("--run", default=None, help="search id; the same id resumes a stopped search")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_optimize_prompt)


def _since(text: str) -> datetime:
    from lightspan.errors import InvalidInput

    units = {"d": "days", "h": "hours", "m": "minutes"}
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # the store's times are naive UTC
    if len(text) > 1 and text[-1] in units and text[:-1].isdigit():
        return now - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--since wants a duration (7d, 12h, 30m) or an ISO time, not {text!r}") from None


def _agent(spec: str) -> Callable[..., object]:
    from lightspan.errors import InvalidInput

    module, _, name = spec.partition(":")
    if not module or not name:
        raise InvalidInput(f"--agent wants module:function, not {spec!r}")
    sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's modules, in spawned runners too
    try:
        agent = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise InvalidInput(f"cannot import the agent {spec!r}: {error}") from None
    if not callable(agent):
        raise InvalidInput(f"--agent {spec!r} is not a function")
    return agent


def _optimize_prompt(args: argparse.Namespace) -> int:
    import lightspan
    from lightspan.errors import InvalidInput
    from lightspan.loop.prompt_fit import production_inputs, search_prompts
    from lightspan.store import Store, default_url
    from lightspan.types import LLM, PromptTemplate

    missing = [f for f in ("llm_base_url", "llm_model", "optimizer_model") if not getattr(args, f)]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise InvalidInput(
            f"optimize-prompt needs {flags} (or OPENAI_BASE_URL, AGENT_MODEL, OPTIMIZER_MODEL)"
        )
    agent = _agent(args.agent)
    with Store.connect(args.store) as store:
        current = store.latest_resource(args.resource)
        if current is None or current.kind != "prompt":
            raise InvalidInput(f"{args.resource!r} has no published prompt version in {store.url}")
        examples, train, val = production_inputs(
            store,
            args.service,
            _since(args.since),
            limit=args.max_rollouts,
            reflect=args.reflect,
            seed=args.seed,
        )
    trainer = lightspan.Trainer(
        algorithm=lightspan.APO(
            optimizer=LLM(args.optimizer_base_url or args.llm_base_url, args.optimizer_model, args.api_key),
            resource=args.resource,
            selection=args.selection,
            rollout_budget=args.rollout_budget,
            optimizer_budget=args.optimizer_budget,
        ),
        initial_resources={args.resource: PromptTemplate(current.content)},
        llm=LLM(args.llm_base_url, args.llm_model, args.api_key),
        store=args.store or default_url(),  # the search's rollouts and candidates go to the same store
        workdir=args.workdir,
        run=args.run,
        n_runners=args.runners,
        seed=args.seed,
    )
    print(
        f"{len(examples)} stored rollouts of {args.service!r} seed reflection; replaying {len(train)} training "
        f"and {len(val)} validation tasks from {current.id}",
        file=sys.stderr,
    )
    result = search_prompts(trainer, agent, train, val, seed_examples=examples)
    print(
        f"validation score {result.seed_val_score:.3f} -> {result.val_score:.3f} ({result.search.rollouts} rollouts)"
    )
    print(f"published: {result.resources_id or 'nothing (no candidate beat ' + current.id + ')'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lightspan.errors import InvalidInput
    from lightspan.loop.demo import run_demo

    workdir = Path(args.workdir)
    if (workdir / "store").exists():
        raise InvalidInput(f"{workdir} holds an earlier demo; remove it or pass another --workdir")
    result = run_demo(
        workdir,
        seed=args.seed,
        iterations=args.iterations,
        runners=args.runners,
        concurrency=args.concurrency,
    )
    success = result.success
    print(
        f"success on the training tasks: {success[0]:.2f} right after the warm-up, {success[-1]:.2f} after "
        f"{len(success) - 1} GRPO updates; held-out tasks: {result.fit.iterations[0].val_reward:.2f} -> "
        f"{result.fit.iterations[-1].val_reward:.2f}"
    )
    print(f"final checkpoint: {result.fit.checkpoint} ({result.fit.resources_id})")
    print(f"plot: {result.plot}   time: {result.seconds / 60:.1f} min")
    return 0
